"""The multi-turn benchmark's summary: hit rate of follow-ups, where turns ran."""

from __future__ import annotations

import pytest

from pdserve.cluster.bench_multiturn import Turn, summarize_multiturn


def test_the_hit_rate_counts_follow_up_turns_only_and_local_prefills_are_named():
    turns = [
        Turn(0, 0, 0.10, 210, 0, "prefill-0", "decode-0"),
        Turn(1, 0, 0.20, 210, 208, "prefill-1", "decode-1"),
        Turn(0, 1, 0.05, 300, 288, "", "decode-0"),
        Turn(1, 1, 0.07, 300, 0, "prefill-0", "decode-0"),
    ]
    s = summarize_multiturn(turns, 1.0)
    assert s["follow_up_hit_rate"] == pytest.approx(288 / 600)
    assert s["decode_turns"] == {"decode-0": 3, "decode-1": 1}
    assert s["first_turns_by_decode"] == {"decode-0": 1, "decode-1": 1}
    assert s["prefill_turns"] == {"local": 1, "prefill-0": 2, "prefill-1": 1}
    assert s["ttft_follow_up_ms"]["p50"] == pytest.approx(60.0)
