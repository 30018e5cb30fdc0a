"""KV transfer channels between a prefill rank and a decode rank.

A channel is a 2-rank process group of its own (gloo for CPU tensors, NCCL for CUDA tensors)
over a `TCPStore` that the decode side hosts. It is created on first use from an address that
the two workers exchange through Ray, so workers join and leave without a global world.

Every message is a fixed-size int64 header, then (for KV and DONE) a payload whose size the
header states, so the receiver always posts a receive of exactly the right size:

- KV:     one layer's keys and values of a token range `[start, start + n)`, `[n, 2, heads, D]`
- DONE:   the transfer is complete; carries the first sampled token and a float64 payload
          (timings, and the first token's logprobs when asked)
- CANCEL: the sender gave the transfer up; the receiver frees what it reserved
- KEEPALIVE: nothing; sent while transfers wait in the prefill queue, so the receiver's
          timeout measures a silent peer, not a long queue

Payloads are token-granular, so a transfer moves exactly layers x 2 x heads x head_dim x
tokens x dtype bytes whatever the block size. A receive that times out breaks the group (see
PLATFORM.md): after any failure the channel is discarded and a new one is built on next use.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.api.errors import TransferFailed

logger = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1
KIND_KV, KIND_DONE, KIND_CANCEL, KIND_KEEPALIVE = 1, 2, 3, 4
_HEADER_LEN = 8
_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Message:
    kind: int
    transfer_id: int
    layer: int = 0
    token_start: int = 0
    first_token: int = 0
    payload: torch.Tensor | None = None


def token_slots(
    block_ids: list[int], block_size: int, start: int, end: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block index, offset in block) of each token position in `[start, end)`."""
    pos = torch.arange(start, end)
    blocks = torch.tensor(block_ids, dtype=torch.long)[pos // block_size]
    return blocks.to(device), (pos % block_size).to(device)


def gather_tokens(
    kv_cache: torch.Tensor, layer: int, slots: tuple[torch.Tensor, torch.Tensor], heads: slice
) -> torch.Tensor:
    """One layer's K and V of the given token slots and KV heads, as `[n, 2, heads, D]`."""
    blocks, offsets = slots
    return kv_cache[layer][:, blocks, heads, offsets].contiguous()


def scatter_tokens(
    kv_cache: torch.Tensor,
    layer: int,
    slots: tuple[torch.Tensor, torch.Tensor],
    heads: slice,
    payload: torch.Tensor,
) -> None:
    blocks, offsets = slots
    kv_cache[layer][:, blocks, heads, offsets] = payload


class KVChannel:
    """One end of a channel. The sender end queues sends (isend) and `flush()` waits for
    them; the receiver end receives one `Message` at a time."""

    def __init__(self, group, rank: int, device: torch.device) -> None:
        self._group = group
        self._rank = rank
        self._peer = 1 - rank
        self._device = device
        self._pending: list[tuple[object, torch.Tensor]] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.broken = False
        self.last_send = time.monotonic()

    @staticmethod
    def host_store(host: str, timeout_s: float) -> dist.TCPStore:
        """The decode side's rendezvous store; its `.port` is the address to hand out."""
        return dist.TCPStore(
            host,
            0,
            2,
            True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )

    @classmethod
    def join(
        cls,
        host: str,
        port: int,
        rank: int,
        device: torch.device,
        timeout_s: float,
        store: dist.TCPStore | None = None,
    ) -> KVChannel:
        """Blocks until both ends have joined. The receiver passes the store it hosts."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, port, 2, False, timeout=timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            group = dist.ProcessGroupNCCL(store, rank, 2, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            group = dist.ProcessGroupGloo(store, rank, 2, opts)
        return cls(group, rank, device)

    def _header(self, *fields: int) -> torch.Tensor:
        values = list(fields) + [0] * (_HEADER_LEN - len(fields))
        return torch.tensor(values, dtype=torch.int64, device=self._device)

    def _isend(self, tensor: torch.Tensor) -> None:
        if self._group is None:
            raise TransferFailed("the channel is closed")
        try:
            work = self._group.send([tensor], self._peer, 0)
        except RuntimeError as e:
            self.broken = True
            raise TransferFailed(f"send failed: {e}") from e
        self._pending.append((work, tensor))
        self.last_send = time.monotonic()

    def send_kv(
        self, transfer_id: int, layer: int, token_start: int, payload: torch.Tensor
    ) -> None:
        n, two, heads, head_dim = payload.shape
        code = _DTYPES.index(payload.dtype)
        self._isend(
            self._header(KIND_KV, transfer_id, layer, token_start, n, heads, head_dim, code)
        )
        self._isend(payload)
        self.bytes_sent += payload.numel() * payload.element_size()

    def send_done(self, transfer_id: int, first_token: int, values: list[float]) -> None:
        self._isend(self._header(KIND_DONE, transfer_id, first_token, len(values)))
        self._isend(torch.tensor(values, dtype=torch.float64, device=self._device))

    def send_cancel(self, transfer_id: int) -> None:
        self._isend(self._header(KIND_CANCEL, transfer_id))

    def send_keepalive(self) -> None:
        self._isend(self._header(KIND_KEEPALIVE, 0))

    def flush(self) -> None:
        """Waits until every queued send has left; raises TransferFailed (and marks the
        channel broken) if one failed or timed out."""
        pending, self._pending = self._pending, []
        try:
            for work, _ in pending:
                work.wait()
        except RuntimeError as e:
            self.broken = True
            raise TransferFailed(f"send did not complete: {e}") from e

    def recv(self) -> Message:
        """Blocks for the next message; raises TransferFailed on timeout or a dead peer."""
        if self._group is None:
            raise TransferFailed("the channel is closed")
        try:
            header = self._recv(torch.empty(_HEADER_LEN, dtype=torch.int64, device=self._device))
            kind, transfer_id, a, b, c, d, e, f = header.tolist()
            if kind == KIND_KV:
                payload = self._recv(torch.empty(c, 2, d, e, dtype=_DTYPES[f], device=self._device))
                self.bytes_received += payload.numel() * payload.element_size()
                return Message(kind, transfer_id, layer=a, token_start=b, payload=payload)
            if kind == KIND_DONE:
                payload = self._recv(torch.empty(b, dtype=torch.float64, device=self._device))
                return Message(kind, transfer_id, first_token=a, payload=payload)
            if kind in (KIND_CANCEL, KIND_KEEPALIVE):
                return Message(kind, transfer_id)
            raise TransferFailed(f"unknown message kind {kind}")
        except RuntimeError as e:
            self.broken = True
            raise TransferFailed(f"receive failed: {e}") from e

    def close(self) -> None:
        """Tears the group down; a peer blocked on it fails at once instead of waiting out the
        timeout. NOTE: `abort()` alone leaves gloo's sockets open; dropping the last reference
        to the group is what closes them."""
        self.broken = True
        self._pending = []
        group, self._group = self._group, None
        if group is not None:
            try:
                group.abort()
            except RuntimeError as e:
                logger.debug("closing a KV channel: %s", e)

    def _recv(self, buf: torch.Tensor) -> torch.Tensor:
        self._group.recv([buf], self._peer, 0).wait()
        return buf
