"""The placement policies: least loaded by the router's in-flight counts, and round robin."""

from __future__ import annotations

import pytest

from pdserve.api.errors import PdserveError
from pdserve.router.placement import Assignment, Placer


def test_least_loaded_picks_fewest_in_flight_with_ties_by_id():
    placer = Placer("least_loaded", ["p1", "p0"], ["d1", "d0", "d2"])
    assert placer.place() == Assignment("p0", "d0")
    assert placer.place() == Assignment("p1", "d1")
    assert placer.place() == Assignment("p0", "d2")
    assert placer.place() == Assignment("p1", "d0")


def test_least_loaded_prefers_workers_whose_requests_finished():
    placer = Placer("least_loaded", ["p0", "p1"], ["d0", "d1"])
    first = placer.place()
    second = placer.place()
    assert (first.decode, second.decode) == ("d0", "d1")
    placer.decode_done(first)
    assert placer.place().decode == "d0"
    placer.prefill_done(first)
    assert placer.place().prefill == "p0"


def test_prefill_load_ends_when_prefill_returns_while_decode_load_lasts():
    placer = Placer("least_loaded", ["p0", "p1"], ["d0", "d1"])
    a = placer.place()
    placer.prefill_done(a)
    b = placer.place()
    assert b.prefill == a.prefill == "p0"
    assert b.decode == "d1"


def test_round_robin_cycles_in_id_order_regardless_of_load():
    placer = Placer("round_robin", ["p1", "p0"], ["d0", "d1", "d2"])
    got = [placer.place() for _ in range(4)]
    assert [a.prefill for a in got] == ["p0", "p1", "p0", "p1"]
    assert [a.decode for a in got] == ["d0", "d1", "d2", "d0"]


def test_a_lost_decode_worker_gets_no_more_requests():
    placer = Placer("least_loaded", ["p0"], ["d0", "d1"])
    placer.remove_decode("d0")
    assert {placer.place().decode for _ in range(3)} == {"d1"}


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin"])
def test_no_workers_is_unavailable(policy):
    with pytest.raises(PdserveError) as info:
        Placer(policy, [], ["d0"]).place()
    assert info.value.grpc_code == "UNAVAILABLE"
    assert "prefill" in str(info.value)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="cheapest"):
        Placer("cheapest", ["p0"], ["d0"])
