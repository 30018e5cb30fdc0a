"""A KV channel: a 2-rank process group between one prefill rank and one decode rank.

A channel is a process group of its own (gloo for CPU tensors, NCCL for CUDA tensors) over a
`TCPStore` that the decode side hosts, on the node's cluster address only. Before the group
forms, the joining side proves that it holds the cluster's secret (an HMAC of a nonce the store
offers), so no process outside the cluster can hand a decode worker KV. It is created on first
use from an address that the two workers exchange through Ray, so workers join and leave
without a global world. It carries the typed messages of `messages.py`; KV payloads are
token-granular, so a transfer moves exactly layers x 2 x heads x head_dim x tokens x dtype bytes
whatever the block size.

A receive that times out breaks the group (see PLATFORM.md): after any failure the channel is
discarded and a new one is built on next use.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import secrets
import time

import torch
import torch.distributed as dist

from pdserve.api.errors import TransferFailed
from pdserve.engine.kv_transfer.messages import (
    DTYPES,
    HEADER_LEN,
    KIND_CANCEL,
    KIND_DONE,
    KIND_KEEPALIVE,
    KIND_KV,
    KeepAlive,
    KVChunk,
    Message,
    TransferCancel,
    TransferDone,
    decode_done,
    encode_done,
)
from pdserve.engine.store import bound_group, bound_store

logger = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1
_NONCE_KEY, _PROOF_KEY = "pdserve/nonce", "pdserve/proof"


def _proof(secret: bytes, nonce: bytes) -> str:
    return hmac.new(secret, nonce, hashlib.sha256).hexdigest()


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
        """The decode side's rendezvous store, listening on `host` only; its `.port` is the
        address to hand out. It holds a fresh nonce for the joining side to prove the secret
        against."""
        store = bound_store(host, 2, timeout_s)
        store.set(_NONCE_KEY, secrets.token_bytes(16))
        return store

    @classmethod
    def accept(
        cls,
        store: dist.TCPStore,
        host: str,
        device: torch.device,
        timeout_s: float,
        secret: bytes,
    ) -> KVChannel:
        """The receiving end, on the store it hosts: blocks until the peer has proved that it
        holds the cluster's `secret` (raises TransferFailed if it proves otherwise) and joined."""
        try:
            store.wait([_PROOF_KEY])
            proof = store.get(_PROOF_KEY).decode()
        except RuntimeError as e:
            raise TransferFailed(f"no peer joined the KV channel: {e}") from e
        if not hmac.compare_digest(proof, _proof(secret, store.get(_NONCE_KEY))):
            raise TransferFailed("refused a KV channel: the peer did not prove the cluster secret")
        return cls._group(store, proof, RECEIVER, host, device, timeout_s)

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        local_host: str,
        device: torch.device,
        timeout_s: float,
        secret: bytes,
    ) -> KVChannel:
        """The sending end: joins the store at `host:port`, proves `secret`, and blocks until
        the group is formed; its own sockets listen on `local_host`."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, 2, False, timeout=timeout)
        proof = _proof(secret, store.get(_NONCE_KEY))
        store.set(_PROOF_KEY, proof)
        return cls._group(store, proof, SENDER, local_host, device, timeout_s)

    @classmethod
    def _group(
        cls,
        store: dist.TCPStore,
        proof: str,
        rank: int,
        local_host: str,
        device: torch.device,
        timeout_s: float,
    ) -> KVChannel:
        # NOTE: the group meets under a prefix named by the proof, so a client of the store
        # that cannot compute it cannot take part in (or disturb) the group's rendezvous.
        store = dist.PrefixStore(f"{proof}/", store)
        return cls(bound_group(store, rank, 2, local_host, device, timeout_s), rank, device)

    def _header(self, *fields: int) -> torch.Tensor:
        values = list(fields) + [0] * (HEADER_LEN - len(fields))
        return torch.tensor(values, dtype=torch.int64, device=self._device)

    def _isend(self, tensor: torch.Tensor) -> None:
        group = self._group
        if group is None:
            raise TransferFailed("the channel is closed")
        try:
            work = group.send([tensor], self._peer, 0)
        except RuntimeError as e:
            self.broken = True
            raise TransferFailed(f"send failed: {e}") from e
        self._pending.append((work, tensor))
        self.last_send = time.monotonic()

    def send(self, msg: Message) -> None:
        """Queues `msg` (isend); `flush()` waits until it has left."""
        if isinstance(msg, KVChunk):
            n, two, heads, head_dim = msg.payload.shape
            code = DTYPES.index(msg.payload.dtype)
            self._isend(
                self._header(
                    KIND_KV, msg.transfer_id, msg.layer, msg.token_start, n, heads, head_dim, code
                )
            )
            self._isend(msg.payload)
            self.bytes_sent += msg.payload.numel() * msg.payload.element_size()
        elif isinstance(msg, TransferDone):
            body = torch.frombuffer(bytearray(encode_done(msg)), dtype=torch.uint8)
            self._isend(self._header(KIND_DONE, msg.transfer_id, body.numel()))
            self._isend(body.to(self._device))
        elif isinstance(msg, TransferCancel):
            self._isend(self._header(KIND_CANCEL, msg.transfer_id))
        else:
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
            header = self._recv(torch.empty(HEADER_LEN, dtype=torch.int64, device=self._device))
            kind, transfer_id, a, b, c, d, e, f = header.tolist()
            if kind == KIND_KV:
                payload = self._recv(torch.empty(c, 2, d, e, dtype=DTYPES[f], device=self._device))
                self.bytes_received += payload.numel() * payload.element_size()
                return KVChunk(transfer_id, a, b, payload)
            if kind == KIND_DONE:
                body = self._recv(torch.empty(a, dtype=torch.uint8, device=self._device))
                return decode_done(body.cpu().numpy().tobytes())
            if kind == KIND_CANCEL:
                return TransferCancel(transfer_id)
            if kind == KIND_KEEPALIVE:
                return KeepAlive()
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
