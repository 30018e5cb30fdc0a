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


def test_the_status_table_shows_each_ranks_node_and_memory_under_its_worker():
    mib = 2**20
    ranks = [
        pb.RankInfo(rank=r, node=f"node{r}", weight_bytes=13 * mib, kv_cache_bytes=8 * mib)
        for r in range(2)
    ]
    ranks[1].kv_bytes = 3 * mib
    decode = pb.WorkerInfo(id="decode-0", role="decode", tp=2, ranks=ranks)
    _, worker, rank0, rank1 = format_workers([decode]).split("\n")
    assert worker.split()[:3] == ["decode-0", "decode", "2"]
    assert (
        rank0.split()
        == "rank 0 node node0 weights 13.0 MiB kv cache 8.0 MiB kv recv 0.0 MiB".split()
    )
    assert rank1.split()[:4] == ["rank", "1", "node", "node1"]
    assert rank1.endswith("kv recv 3.0 MiB")
