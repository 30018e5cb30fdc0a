"""`pdserve demo`: start the local cluster, stream a few requests through the client, stop.

Greedy requests and a seeded sampled one: two runs print the same text.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from pdserve.cluster.config import ClusterConfig

PROMPTS = [
    ("text, greedy", "The capital of France is", {}),
    ("chat, greedy", [{"role": "user", "content": "What is the capital of Japan?"}], {}),
    (
        "chat, sampled with a seed",
        [{"role": "user", "content": "Write one sentence about the sea."}],
        {"temperature": 0.7, "top_p": 0.9, "seed": 7},
    ),
]


def run_demo(config: ClusterConfig, max_tokens: int = 32) -> int:
    from pdserve.api.client import Client
    from pdserve.cluster.launcher import BackgroundCluster

    host = config.router.listen.rpartition(":")[0]
    config = dataclasses.replace(
        config, router=dataclasses.replace(config.router, listen=f"{host}:0")
    )
    t0 = time.perf_counter()
    with BackgroundCluster(config) as cluster, Client(cluster.target) as client:
        print(f"cluster up in {time.perf_counter() - t0:.1f}s, router on {cluster.target}")
        for name, prompt, sampling in PROMPTS:
            print(f"\n[{name}] {prompt if isinstance(prompt, str) else prompt[-1]['content']}")
            finish = ""
            for delta in client.generate(prompt, max_tokens=max_tokens, **sampling):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                if delta.finish_reason:
                    finish = delta.finish_reason
                    t = delta.timings
                    u = delta.usage
            print(
                f"\n  -> {finish}: {u.prompt_tokens} prompt + {u.completion_tokens} output "
                f"tokens, ttft {1e3 * t.ttft_s:.0f} ms, prefill {1e3 * t.prefill_s:.0f} ms, "
                f"total {1e3 * t.total_s:.0f} ms"
            )
        print()
        for w in client.status().workers:
            print(
                f"  {w.id:10s} {w.role:8s} running={w.running} "
                f"free_blocks={w.free_blocks}/{w.total_blocks}"
            )
    print("cluster stopped")
    return 0
