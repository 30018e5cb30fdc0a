"""Sampling parameters: every bad field is refused with its name."""

from __future__ import annotations

import pytest

from pdserve.api.errors import InvalidRequest
from pdserve.api.sampling import SamplingParams


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"bogus": 1}, "bogus"),
        ({"top_k": -2}, "top_k"),
        ({"stop": "x"}, "stop"),
        ({"seed": 1.5}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
def test_bad_sampling_field_is_named(values, field):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams.from_dict(values)
    assert e.value.field == field
    assert field in str(e.value)


def test_round_trip_through_a_dict_keeps_every_field():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, stop=("x",), seed=9)
    assert SamplingParams.from_dict(params.to_dict()) == params


def test_defaults_are_greedy():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.7).greedy is False
