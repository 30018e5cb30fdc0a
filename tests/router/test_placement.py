"""The placement policies: cache aware (radix index against load), least loaded by the router's
in-flight counts, and round robin."""

from __future__ import annotations

import pytest

from pdserve.api.block_hash import block_hashes
from pdserve.api.errors import PdserveError
from pdserve.api.kv_events import BlockStored, KVSnapshot, WorkerLoad
from pdserve.router.index import RadixIndex
from pdserve.router.placement import Assignment, Demand, Placer

ANY = Demand(hashes=(), num_tokens=100, max_tokens=10)


def test_least_loaded_picks_fewest_in_flight_with_ties_by_id():
    placer = Placer("least_loaded", ["p1", "p0"], ["d1", "d0", "d2"])
    assert placer.place(ANY) == Assignment("p0", "d0", 100, 110)
    assert placer.place(ANY) == Assignment("p1", "d1", 100, 110)
    assert placer.place(ANY) == Assignment("p0", "d2", 100, 110)
    assert placer.place(ANY) == Assignment("p1", "d0", 100, 110)


def test_least_loaded_prefers_workers_whose_requests_finished():
    placer = Placer("least_loaded", ["p0", "p1"], ["d0", "d1"])
    first = placer.place(ANY)
    second = placer.place(ANY)
    assert (first.decode, second.decode) == ("d0", "d1")
    placer.decode_done(first)
    assert placer.place(ANY).decode == "d0"
    placer.prefill_done(first)
    assert placer.place(ANY).prefill == "p0"


def test_prefill_load_ends_when_prefill_returns_while_decode_load_lasts():
    placer = Placer("least_loaded", ["p0", "p1"], ["d0", "d1"])
    a = placer.place(ANY)
    placer.prefill_done(a)
    b = placer.place(ANY)
    assert b.prefill == a.prefill == "p0"
    assert b.decode == "d1"


def test_round_robin_cycles_in_id_order_regardless_of_load():
    placer = Placer("round_robin", ["p1", "p0"], ["d0", "d1", "d2"])
    got = [placer.place(ANY) for _ in range(4)]
    assert [a.prefill for a in got] == ["p0", "p1", "p0", "p1"]
    assert [a.decode for a in got] == ["d0", "d1", "d2", "d0"]


def test_a_disabled_decode_worker_gets_no_requests_until_enabled_again():
    placer = Placer("least_loaded", ["p0"], ["d0", "d1"])
    placer.disable("decode", "d0")
    assert {placer.place(ANY).decode for _ in range(3)} == {"d1"}
    placer.enable("decode", "d0")
    assert placer.place(ANY).decode == "d0"


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin"])
def test_no_decode_worker_is_unavailable(policy):
    placer = Placer(policy, ["p0"], ["d0"])
    placer.disable("decode", "d0")
    with pytest.raises(PdserveError) as info:
        placer.place(ANY)
    assert info.value.grpc_code == "UNAVAILABLE"
    assert "decode" in str(info.value)


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin", "cache_aware"])
def test_with_no_prefill_worker_up_the_decode_worker_prefills(policy):
    placer = Placer(policy, ["p0"], ["d0"], local_prefill_max_tokens=0)
    placer.disable("prefill", "p0")
    assert placer.place(Demand((), 4000, 16)) == Assignment("", "d0", 0, 4016)


def test_avoided_decode_workers_are_passed_over():
    placer = Placer("least_loaded", ["p0"], ["d0", "d1", "d2"])
    avoid = frozenset({"d0", "d1"})
    assert {placer.place(Demand((), 8, 8, avoid=avoid)).decode for _ in range(3)} == {"d2"}


def test_a_release_after_a_worker_came_back_never_goes_below_zero():
    placer = Placer("least_loaded", ["p0"], ["d0"])
    a = placer.place(ANY)
    placer.disable("decode", "d0")
    placer.enable("decode", "d0")
    placer.decode_done(a)
    assert placer.decode.requests == {"d0": 0} and placer.decode.tokens == {"d0": 0}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="cheapest"):
        Placer("cheapest", ["p0"], ["d0"])


BLOCK = 16
SALT = 11
ROOMY = WorkerLoad(running=0, waiting=0, free_blocks=10_000, total_blocks=10_000)
SYSTEM = list(range(1000, 1208))  # 13 blocks, shared by every conversation


def tokens(conversation: int, n: int) -> list[int]:
    return [(conversation * 7919 + i) % 30_000 for i in range(n)]


def hashes(ids: list[int]) -> list[int]:
    return block_hashes(ids, BLOCK, SALT)


def holding(cached: dict[str, list[list[int]]], load: WorkerLoad = ROOMY) -> RadixIndex:
    """An index in which each worker holds the blocks of the given token sequences."""
    index = RadixIndex()
    for worker, sequences in cached.items():
        blocks = {h: None for ids in sequences for h in hashes(ids)}
        index.resync(KVSnapshot(worker, 1, 0, tuple(BlockStored(h, None) for h in blocks), load))
    return index


def aware(index: RadixIndex, **kwargs) -> Placer:
    return Placer(
        "cache_aware", ["p0", "p1"], ["d0", "d1"], index=index, block_size=BLOCK, **kwargs
    )


def demand(ids: list[int], max_tokens: int = 64, **pins: str) -> Demand:
    return Demand(hashes(ids), len(ids), max_tokens, **pins)


def test_a_follow_up_turn_stays_on_the_worker_holding_its_conversation():
    turn1 = SYSTEM + tokens(1, 300)
    turn2 = turn1 + tokens(2, 40)
    placer = aware(holding({"d0": [SYSTEM, turn1], "d1": [SYSTEM]}))
    placer.place(demand(SYSTEM + tokens(3, 60)))  # some other request, now on d0
    assert placer.decode.requests == {"d0": 1, "d1": 0}
    assert placer.place(demand(turn2)).decode == "d0"


def test_new_conversations_sharing_a_system_prompt_spread_across_workers():
    for cached in ({"d0": [SYSTEM], "d1": [SYSTEM]}, {"d0": [SYSTEM], "d1": []}):
        placer = aware(holding(cached))
        chosen = [placer.place(demand(SYSTEM + tokens(c, 50))).decode for c in range(8)]
        assert {chosen.count("d0"), chosen.count("d1")} <= {3, 4, 5}, (cached, chosen)


def test_a_much_busier_home_worker_loses_the_follow_up():
    turn1 = SYSTEM + tokens(1, 300)
    placer = aware(holding({"d0": [SYSTEM, turn1], "d1": [SYSTEM]}))
    for c in range(6):
        placer.place(demand(turn1 + tokens(c, 40), decode_worker="d0"))
    assert placer.place(demand(turn1 + tokens(9, 40))).decode == "d1"


def test_the_cache_weight_sets_how_much_load_a_cached_prefix_is_worth():
    turn1 = SYSTEM + tokens(1, 300)
    cached = {"d0": [SYSTEM, turn1], "d1": [SYSTEM]}
    chosen = {}
    for weight in (0.5, 4.0):
        placer = aware(holding(cached), cache_weight=weight)
        placer.place(demand(turn1 + tokens(5, 40), decode_worker="d0"))
        chosen[weight] = placer.place(demand(turn1 + tokens(9, 40))).decode
    assert chosen == {0.5: "d1", 4.0: "d0"}


def test_a_worker_without_room_for_the_request_is_passed_over():
    turn1 = SYSTEM + tokens(1, 300)
    index = holding({"d0": [SYSTEM, turn1]}, WorkerLoad(3, 2, 2, 10_000))
    index.resync(KVSnapshot("d1", 1, 0, (), ROOMY))
    assert aware(index).place(demand(turn1 + tokens(2, 40))).decode == "d1"


def test_a_decode_worker_holding_all_but_a_short_tail_prefills_it_itself():
    turn1 = SYSTEM + tokens(1, 300)
    placer = aware(holding({"d0": [turn1], "p1": [turn1]}), local_prefill_max_tokens=256)
    local = placer.place(demand(turn1 + tokens(2, 240)))
    assert (local.decode, local.prefill) == ("d0", "")
    remote = placer.place(demand(turn1 + tokens(3, 270)))
    assert (remote.decode, remote.prefill) == ("d0", "p1")
    assert remote.prefill_tokens == 270 + len(turn1) % BLOCK
    assert placer.prefill.tokens == {"p0": 0, "p1": remote.prefill_tokens}


def test_a_short_prompt_on_a_cold_cache_is_prefilled_by_the_decode_worker():
    assert aware(RadixIndex()).place(demand(tokens(1, 200))).prefill == ""
    assert aware(RadixIndex()).place(demand(tokens(1, 300))).prefill == "p0"


def test_a_pinned_worker_is_used_and_a_pinned_prefill_worker_forces_the_transfer():
    turn1 = SYSTEM + tokens(1, 300)
    placer = aware(holding({"d0": [turn1]}))
    pinned = placer.place(demand(turn1, decode_worker="d1", prefill_worker="p1"))
    assert (pinned.decode, pinned.prefill) == ("d1", "p1")
    assert placer.place(demand(turn1, prefill_worker="p0")).prefill == "p0"
    assert placer.place(demand(turn1, decode_worker="d1")).decode == "d1"


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_pin_to_an_unknown_worker_is_invalid_argument_naming_it(role):
    with pytest.raises(PdserveError) as info:
        aware(RadixIndex()).place(demand(SYSTEM, **{f"{role}_worker": "gpu-7"}))
    assert info.value.grpc_code == "INVALID_ARGUMENT"
    assert str(info.value).startswith(f"placement.{role}_worker:")
    assert "'gpu-7'" in str(info.value)


def test_a_pin_to_a_disabled_decode_worker_is_unavailable():
    placer = aware(RadixIndex())
    placer.disable("decode", "d1")
    with pytest.raises(PdserveError) as info:
        placer.place(demand(SYSTEM, decode_worker="d1"))
    assert info.value.grpc_code == "UNAVAILABLE"


def test_finished_requests_release_their_tokens():
    placer = aware(RadixIndex())
    a = placer.place(demand(tokens(1, 400)))
    b = placer.place(demand(tokens(2, 100)))
    assert b.prefill == ""
    placer.prefill_done(a)
    placer.prefill_done(b)
    placer.decode_done(a)
    placer.decode_done(b)
    assert placer.prefill.tokens == {"p0": 0, "p1": 0}
    assert placer.decode.tokens == {"d0": 0, "d1": 0}
    assert placer.decode.requests == {"d0": 0, "d1": 0}
