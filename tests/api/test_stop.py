"""Stop strings end the output at their first occurrence, even when split across deltas."""

from __future__ import annotations

import random

import pytest

from pdserve.api.errors import InvalidRequest
from pdserve.api.stop import StopStringMatcher


def _run(stop, deltas):
    matcher = StopStringMatcher(stop)
    emitted = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        emitted.append(text)
        if stopped:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def test_stop_string_spanning_two_deltas_is_not_emitted():
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("Hello wor") == ("Hello ", False)
    assert matcher.feed("ld! and more") == ("", True)


def test_text_after_the_stop_string_in_the_same_delta_is_dropped():
    emitted, stopped = _run(["STOP"], ["one two ST", "OP three"])
    assert stopped
    assert "".join(emitted) == "one two "


def test_stop_string_spanning_many_single_character_deltas():
    emitted, stopped = _run(["</answer>"], list("The answer is 42.</answer> trailing"))
    assert stopped
    assert "".join(emitted) == "The answer is 42."


def test_overlapping_prefix_still_matches():
    # After "aa" the held tail must shift to the last "a", or "aab" is missed.
    emitted, stopped = _run(["aab"], ["a", "a", "a", "b", "c"])
    assert stopped
    assert "".join(emitted) == "a"


def test_repeated_partial_matches_release_text_that_cannot_start_a_match():
    matcher = StopStringMatcher(["abab"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("a") == ("", False)  # "aba" could still become "abab"
    assert matcher.feed("c") == ("abac", False)
    assert matcher.feed("abab") == ("", True)


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["world", "lo w", "xyz"])
    assert matcher.feed("Hello world") == ("Hel", True)


def test_a_later_stop_string_does_not_win_over_an_earlier_one():
    emitted, stopped = _run(["END", "."], ["first END", " then a period."])
    assert stopped
    assert "".join(emitted) == "first "


def test_text_is_held_only_while_it_could_start_a_stop_string():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a#") == ("a", False)
    assert matcher.feed("b") == ("#b", False)


def test_flush_releases_a_held_tail_when_nothing_matched():
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("Hello wo") == ("Hello ", False)
    assert matcher.flush() == "wo"
    assert matcher.flush() == ""


def test_nothing_is_emitted_after_a_match():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("ax") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_without_stop_strings_everything_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_unicode_stop_strings():
    emitted, stopped = _run(["山🌊"], ["見て", "山", "🌊です"])
    assert stopped
    assert "".join(emitted) == "見て"


def test_empty_stop_string_is_refused():
    with pytest.raises(InvalidRequest) as info:
        StopStringMatcher(["ok", ""])
    assert info.value.field == "stop"


@pytest.mark.parametrize("seed", range(200))
def test_random_splits_give_the_same_result_as_the_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab c"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stop = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in "12"})
    # With no stop string inside another, "first to complete" and "earliest start" agree.
    if any(a != b and a in b for a in stop for b in stop):
        stop = stop[:1]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    emitted, stopped = _run(stop, deltas)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    assert stopped == bool(hits)
    assert "".join(emitted) == (text[: min(hits)] if hits else text)
