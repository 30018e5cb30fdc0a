"""What rank 0 of a tensor-parallel prefill worker tells its other ranks to do with their KV
heads, so that each rank sends its own heads on its own channels.

Rank 0's `KVSender` decides everything (what to gather, when a transfer's reservation has
landed, what to send, when a channel is given up); every decision that touches KV or a
channel is also written down as an order. The orders of a step go to the other ranks over the
worker's group right after it (`step_broadcast.send_orders`), before the next step can reuse
any block, and each rank carries them out on its own heads: the same chunks, the same messages,
on its channels to the same decode worker (`epoch` names rank 0's channel set).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from pdserve.engine.kv_transfer.messages import (
    KeepAlive,
    Message,
    TransferCancel,
    TransferDone,
    decode_done,
    encode_done,
)


@dataclass(frozen=True)
class Gather:
    """Stage one layer's KV of these slots (block * block_size + offset) for a request."""

    attempt_id: str
    layer: int
    token_start: int
    slots: list[int]


@dataclass(frozen=True)
class SendChunk:
    """Send tokens `[token_start, token_start + n)` of the chunk staged at `gather_start`."""

    attempt_id: str
    decode_id: str
    epoch: int
    transfer_id: int
    layer: int
    gather_start: int
    token_start: int
    n: int


@dataclass(frozen=True)
class Relay:
    """Send this control message (done, cancel, keep-alive) on the channels too."""

    decode_id: str
    epoch: int
    message: Message


@dataclass(frozen=True)
class Flush:
    decode_id: str
    epoch: int


@dataclass(frozen=True)
class Drop:
    """The request's transfer is over: free what is staged for it."""

    attempt_id: str


@dataclass(frozen=True)
class CloseChannels:
    decode_id: str
    epoch: int


Order = Gather | SendChunk | Relay | Flush | Drop | CloseChannels
_KINDS: list[type] = [Gather, SendChunk, Relay, Flush, Drop, CloseChannels]
_DONE, _CANCEL, _KEEPALIVE = 0, 1, 2


def encode_orders(orders: list[Order]) -> bytes:
    rows = []
    for o in orders:
        if isinstance(o, Relay):
            m = o.message
            body = (
                [_DONE, encode_done(m)]
                if isinstance(m, TransferDone)
                else [_CANCEL, m.transfer_id]
                if isinstance(m, TransferCancel)
                else [_KEEPALIVE, None]
            )
            rows.append([_KINDS.index(Relay), o.decode_id, o.epoch, body])
        else:
            rows.append([_KINDS.index(type(o)), *vars(o).values()])
    return msgpack.packb(rows)


def decode_orders(data: bytes) -> list[Order]:
    orders: list[Order] = []
    for kind, *fields in msgpack.unpackb(data):
        cls = _KINDS[kind]
        if cls is Relay:
            decode_id, epoch, (what, value) = fields
            message: Message = (
                decode_done(value)
                if what == _DONE
                else TransferCancel(value)
                if what == _CANCEL
                else KeepAlive()
            )
            orders.append(Relay(decode_id, epoch, message))
        else:
            orders.append(cls(*fields))
    return orders
