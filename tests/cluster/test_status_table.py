"""`pdserve status`: one line per worker with its load and prefix-cache counters."""

from __future__ import annotations

from pdserve.cluster.cli import format_workers
from pdserve.proto import pdserve_pb2 as pb


def test_the_status_table_shows_every_counter_under_its_header():
    decode = pb.WorkerInfo(
        id="decode-0",
        role="decode",
        tp=1,
        running=3,
        free_blocks=10,
        total_blocks=512,
        cached_blocks=40,
        requests_total=12,
        prompt_tokens_computed=1200,
        prompt_tokens_cached=800,
        kv_blocks_received=70,
        kv_blocks_sent=5,
    )
    header, row, lost = format_workers([decode, pb.WorkerInfo(id="p", error="gone")]).split("\n")
    cells = dict(
        zip(
            [
                "cached",
                "requests",
                "prompt computed",
                "prompt cached",
                "blocks recv",
                "blocks sent",
            ],
            row.split()[-6:],
        )
    )
    assert cells == {
        "cached": "40",
        "requests": "12",
        "prompt computed": "1200",
        "prompt cached": "800",
        "blocks recv": "70",
        "blocks sent": "5",
    }
    for name in cells:
        assert name in header
    assert "10/512" in row and lost.endswith("error: gone")
