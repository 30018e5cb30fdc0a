"""Heterogeneous tensor parallelism in the KV transfer: every decode rank receives each of its
KV heads exactly once, from a prefill rank that holds it."""

from __future__ import annotations

import itertools

import pytest

from pdserve.engine.kv_transfer.routes import Route, kv_routes
from pdserve.engine.parallel import kv_heads_of


@pytest.mark.parametrize(
    ("num_kv_heads", "prefill_tp", "decode_tp"),
    [
        (kv, p, d)
        for kv, p, d in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4))
        if (kv % p == 0 or p % kv == 0) and (kv % d == 0 or d % kv == 0)
    ],
)
def test_each_decode_rank_gets_each_of_its_heads_once_from_a_holder(
    num_kv_heads, prefill_tp, decode_tp
):
    got: dict[int, list[int]] = {d: [] for d in range(decode_tp)}
    for r in kv_routes(num_kv_heads, prefill_tp, decode_tp):
        held = kv_heads_of(num_kv_heads, r.prefill_rank, prefill_tp)
        owned = kv_heads_of(num_kv_heads, r.decode_rank, decode_tp)
        src = list(held[r.src])
        assert src == list(owned[r.dst]), "a route's heads are the same heads at both ends"
        got[r.decode_rank] += src
    for d, heads in got.items():
        assert sorted(heads) == list(kv_heads_of(num_kv_heads, d, decode_tp))


def test_one_prefill_rank_splits_its_heads_over_two_decode_ranks():
    assert kv_routes(2, 1, 2) == [
        Route(0, 0, slice(0, 1), slice(0, 1)),
        Route(0, 1, slice(1, 2), slice(0, 1)),
    ]


def test_one_decode_rank_gathers_its_heads_from_two_prefill_ranks():
    assert kv_routes(2, 2, 1) == [
        Route(0, 0, slice(0, 1), slice(0, 1)),
        Route(1, 0, slice(0, 1), slice(1, 2)),
    ]


def test_a_replicated_head_is_sent_once_per_decode_rank_from_its_first_holder():
    assert kv_routes(1, 2, 2) == [
        Route(0, 0, slice(0, 1), slice(0, 1)),
        Route(0, 1, slice(0, 1), slice(0, 1)),
    ]
