"""`pdserve bench --colocated`: the same requests through one in-process engine (prefill and
decode on one engine, no router, no transfer), the baseline the cluster is compared with."""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdserve.cluster.bench_report import RequestRecord
from pdserve.cluster.bench_workload import BenchRequest


def run_colocated(
    model: str, requests: Sequence[BenchRequest], dtype: str, device: str, num_blocks: int
) -> tuple[list[RequestRecord], float]:
    """Feeds the requests to one in-process engine at their arrival times, stepping it in
    between."""
    from pdserve.api.sampling import SamplingParams
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, num_blocks=num_blocks))

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    engine.add_request("warmup", requests[0].prompt[:8], params(2))
    while engine.has_unfinished():
        engine.step()
    records: list[RequestRecord] = []
    start = time.monotonic()
    while len(records) < len(requests) or engine.has_unfinished():
        now = time.monotonic()
        while len(records) < len(requests) and start + requests[len(records)].arrival_s <= now:
            r = requests[len(records)]
            engine.add_request(str(len(records)), r.prompt, params(r.max_tokens))
            records.append(RequestRecord(now, len(r.prompt)))
        if not engine.has_unfinished():
            time.sleep(max(0.0, start + requests[len(records)].arrival_s - now))
            continue
        outputs = engine.step()
        stepped = time.monotonic()
        for out in outputs:
            record = records[int(out.request_id)]
            record.tokens_arrived(len(out.new_token_ids), stepped)
            if out.finished:
                record.end = stepped
    return records, time.monotonic() - start
