"""One prefill rank's channels to one decode worker: a channel per decode rank it sends KV
heads to (its `Route`). A message goes on every channel; a KV chunk carries only the heads
of the route."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.kv_transfer.channel import KVChannel
from pdserve.engine.kv_transfer.messages import KVChunk, Message
from pdserve.engine.kv_transfer.routes import Route


@dataclass(eq=False)
class Links:
    links: list[tuple[Route, KVChannel]]

    @property
    def broken(self) -> bool:
        return any(kv.broken for _, kv in self.links)

    @property
    def bytes_sent(self) -> int:
        return sum(kv.bytes_sent for _, kv in self.links)

    @property
    def last_send(self) -> float:
        return min(kv.last_send for _, kv in self.links)

    def send(self, msg: Message) -> None:
        for route, kv in self.links:
            if isinstance(msg, KVChunk):
                heads = msg.payload[:, :, route.src].contiguous()
                kv.send(KVChunk(msg.transfer_id, msg.layer, msg.token_start, heads))
            else:
                kv.send(msg)

    def flush(self) -> None:
        for _, kv in self.links:
            kv.flush()

    def close(self) -> None:
        for _, kv in self.links:
            kv.close()
