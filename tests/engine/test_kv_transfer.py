"""KV channels over a real 2-rank gloo group (both ends in this process, one per thread)."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
import torch

from pdserve.api.errors import TransferFailed
from pdserve.api.messages import TokenLogprobs
from pdserve.engine.kv_pool import allocate_kv_cache
from pdserve.engine.kv_transfer.channel import KVChannel
from pdserve.engine.kv_transfer.messages import KeepAlive, KVChunk, TransferCancel, TransferDone
from pdserve.engine.kv_transfer.slots import gather_tokens, scatter_tokens, token_slots

CPU = torch.device("cpu")


SECRET = b"the cluster's secret"
HOST = "127.0.0.1"


def _pair(timeout_s: float = 5.0) -> tuple[KVChannel, KVChannel]:
    store = KVChannel.host_store(HOST, timeout_s)
    ends: dict[str, KVChannel] = {}
    receiver = threading.Thread(
        target=lambda: ends.update(r=KVChannel.accept(store, HOST, CPU, timeout_s, SECRET))
    )
    receiver.start()
    sender = KVChannel.connect(HOST, store.port, HOST, CPU, timeout_s, SECRET)
    receiver.join()
    return sender, ends["r"]


def _listening(pid: int) -> list[str]:
    """The local addresses of the TCP sockets that process `pid` listens on (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def test_a_channel_listens_on_the_given_address_only():
    before = set(_listening(os.getpid()))
    sender, receiver = _pair()
    opened = set(_listening(os.getpid())) - before  # the store and both ends' gloo sockets
    assert len(opened) >= 3, opened
    assert all(a.startswith(f"{HOST}:") for a in opened), opened
    sender.close()
    receiver.close()


def test_a_peer_without_the_cluster_secret_is_refused():
    store = KVChannel.host_store(HOST, 5.0)
    refused: list[Exception] = []

    def accept() -> None:
        try:
            KVChannel.accept(store, HOST, CPU, 5.0, SECRET)
        except TransferFailed as e:
            refused.append(e)

    receiver = threading.Thread(target=accept)
    receiver.start()
    intruder = threading.Thread(
        target=lambda: _swallow(KVChannel.connect, HOST, store.port, HOST, CPU, 2.0, b"guess"),
        daemon=True,
    )
    intruder.start()
    receiver.join(timeout=10)
    assert not receiver.is_alive(), "the receiver still waits for the intruder"
    assert refused and "cluster secret" in str(refused[0])


def _swallow(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # the intruder's side fails one way or another; only the refusal counts
        pass


def test_layer_payloads_land_in_the_receivers_own_blocks():
    src = allocate_kv_cache(2, 8, 2, 4, 8, torch.float32, CPU)
    src.normal_()
    dst = allocate_kv_cache(2, 8, 2, 4, 8, torch.float32, CPU)
    src_blocks, dst_blocks = [5, 1, 6], [0, 7, 3]
    sender, receiver = _pair()
    for layer in range(2):
        payload = gather_tokens(src, layer, token_slots(src_blocks, 4, 0, 10, CPU))
        sender.send(KVChunk(7, layer, 0, payload))
    done = TransferDone(7, 42, TokenLogprobs(42, -0.5, ((42, -0.5), (3, -1.5))), 16, 0.1, 0.2, 5.0)
    sender.send(done)
    sender.send(TransferCancel(8))
    sender.send(KeepAlive())
    for layer in range(2):
        msg = receiver.recv()
        assert (msg.transfer_id, msg.layer, msg.token_start) == (7, layer, 0)
        scatter_tokens(dst, layer, token_slots(dst_blocks, 4, 0, 10, CPU), msg.payload)
    assert receiver.recv() == done
    assert receiver.recv() == TransferCancel(8)
    assert receiver.recv() == KeepAlive()
    sender.flush()
    for layer in range(2):
        for kv in range(2):
            got = dst[layer, kv, dst_blocks].transpose(0, 1).reshape(2, -1, 8)[:, :10]
            want = src[layer, kv, src_blocks].transpose(0, 1).reshape(2, -1, 8)[:, :10]
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # exactly tokens x layers x (k, v) x heads x head_dim x 4 bytes, not whole blocks
    assert sender.bytes_sent == receiver.bytes_received == 10 * 2 * 2 * 2 * 8 * 4


def test_a_closed_peer_fails_the_receiver_instead_of_hanging():
    sender, receiver = _pair(timeout_s=30.0)
    errors: list[Exception] = []
    waiting = threading.Thread(target=lambda: _recv_into(receiver, errors))
    waiting.start()
    time.sleep(0.2)
    start = time.monotonic()
    sender.close()
    waiting.join(timeout=20)
    assert not waiting.is_alive(), "the receiver still waits on a closed channel"
    assert time.monotonic() - start < 15
    assert errors and isinstance(errors[0], TransferFailed) and receiver.broken


def _recv_into(channel: KVChannel, errors: list[Exception]) -> None:
    try:
        channel.recv()
    except TransferFailed as e:
        errors.append(e)


def test_a_silent_peer_times_out_into_transfer_failed():
    _, receiver = _pair(timeout_s=1.0)
    with pytest.raises(TransferFailed):
        receiver.recv()
    assert receiver.broken
