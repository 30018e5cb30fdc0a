"""The CPU decode mirror: each row holds exactly its sequence's KV from the paged pool."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine

from pdserve.api.sampling import SamplingParams
from pdserve.kernels.prefill_attention import gather_kv


def _check_rows_match_the_pool(engine) -> int:
    dense = engine.runner.dense
    checked = 0
    for row in dense._rows.values():
        seq, n = row.seq, row.filled
        if not engine.has_request(seq.request_id):
            continue  # finished this step: its row goes at the next plan
        table = torch.tensor(seq.block_ids, dtype=torch.int32)
        for layer in range(engine.kv_cache.shape[0]):
            keys, values = dense._buffer[layer, 0, row.slot], dense._buffer[layer, 1, row.slot]
            k_cache, v_cache = engine.kv_cache[layer, 0], engine.kv_cache[layer, 1]
            assert torch.equal(keys[:, :n], gather_kv(k_cache, table, n))
            assert torch.equal(values[:, :n], gather_kv(v_cache, table, n))
            assert not keys[:, n:].any() and not values[:, n:].any(), "stale data past a row"
        checked += 1
    return checked


def test_mirror_rows_equal_the_paged_kv_as_sequences_join_and_leave(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    g = torch.Generator().manual_seed(3)
    lengths = [3, 9, 2, 14, 6, 11]
    checked = 0
    for step in range(40):
        if step % 4 == 0 and step // 4 < len(lengths):
            i = step // 4
            prompt = torch.randint(3, 1000, (5 + 7 * i,), generator=g).tolist()
            params = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
            engine.add_request(f"r{i}", prompt, params)
        engine.step()
        checked += _check_rows_match_the_pool(engine)
    assert checked > 20
    assert not engine.has_unfinished()


@pytest.mark.parametrize("block_size", [16, 48], ids=["rows-of-whole-blocks", "rows-cut-blocks"])
def test_rows_keep_their_kv_and_zero_tails_when_the_mirror_outgrows_its_capacity(
    tiny_llama_dir, monkeypatch, block_size
):
    engine = make_engine(tiny_llama_dir, block_size=block_size)
    empty = torch.empty

    def garbage(*args, **kwargs):
        """Fresh pages from the OS are zero; a reused allocation is not."""
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", garbage)
    g = torch.Generator().manual_seed(4)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request("short", torch.randint(3, 1000, (8,), generator=g).tolist(), params)
    engine.add_request("long", torch.randint(3, 1000, (118,), generator=g).tolist(), params)
    capacities = set()
    while engine.has_unfinished():
        engine.step()
        if engine.runner.dense._buffer is not None:
            capacities.add(engine.runner.dense._buffer.shape[4])
        _check_rows_match_the_pool(engine)
    assert capacities == {128, 256}, "the long sequence should have grown the mirror once"
