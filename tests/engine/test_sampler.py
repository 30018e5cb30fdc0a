"""Sampling: reproducible by (seed, position), distributions as intended, penalties, logprobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pdserve.api.sampling import SamplingParams
from pdserve.engine.sampler import _filtered_probs, apply_penalties, sample
from pdserve.engine.sequence import Sequence

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
DRAWS = 10_000


def _seq(params: SamplingParams, tokens=(1, 2, 3), prompt_len=None, seed=5) -> Sequence:
    tokens = list(tokens)
    n = len(tokens) if prompt_len is None else prompt_len
    return Sequence("s", tokens, n, params, seed=seed)


def _draw_histogram(params: SamplingParams) -> np.ndarray:
    """10k draws on fixed logits: one row per absolute position of one seeded sequence."""
    seqs = [_seq(params, tokens=[0] * (1 + i)) for i in range(DRAWS)]
    tokens, _ = sample(LOGITS.repeat(DRAWS, 1), seqs)
    return np.bincount(tokens, minlength=len(LOGITS))


def _expected(params: SamplingParams) -> np.ndarray:
    p = torch.softmax(LOGITS / params.temperature, -1).double().numpy()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if params.top_k and rank >= params.top_k:
            break
        if mass >= params.top_p:
            break
        if p[i] < params.min_p * p[order[0]]:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.5, seed=3),
        SamplingParams(temperature=1.0, top_k=3, seed=3),
        SamplingParams(temperature=1.0, top_p=0.7, seed=3),
        SamplingParams(temperature=1.0, min_p=0.2, seed=3),
    ],
    ids=["temperature-1", "temperature-0.5", "top-k", "top-p", "min-p"],
)
def test_draws_fit_the_intended_distribution(params):
    observed = _draw_histogram(params)
    expected = _expected(params)
    assert observed[expected == 0].sum() == 0, "a filtered-out token was drawn"
    support = expected > 0
    _, p_value = chisquare(observed[support], expected[support] * DRAWS)
    assert p_value > 1e-3


def test_wrong_distribution_is_detected_by_the_chi_square_check():
    observed = _draw_histogram(SamplingParams(temperature=1.0, seed=3))
    wrong = _expected(SamplingParams(temperature=0.8))
    _, p_value = chisquare(observed, wrong * DRAWS)
    assert p_value < 1e-6


def test_same_seed_same_tokens_and_different_seeds_differ():
    params = SamplingParams(temperature=1.0)
    logits = LOGITS.repeat(64, 1)

    def run(seed):
        return sample(logits, [_seq(params, [0] * (1 + i), seed=seed) for i in range(64)])[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # prompt [0, 1], output [3, 3, 1]
    seq = _seq(params, tokens=[0, 1, 3, 3, 1], prompt_len=2)
    out = apply_penalties(logits.clone(), [seq])[0]
    expected = [
        2.0 / 2.0,  # prompt token: repetition only
        -1.0 * 2.0 - 0.5 - 0.25 * 1,  # prompt and output once
        0.5,  # unseen
        3.0 / 2.0 - 0.5 - 0.25 * 2,  # output twice
        -2.0,  # unseen
    ]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_logprobs_match_hand_computed_values():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=5.0)
    tokens, lps = sample(logits, [_seq(params, tokens=[2])])
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    # the penalty moves the argmax from 2 to 1, logprobs stay those of the model
    assert tokens == [1]
    assert lps[0].token_id == 1
    assert lps[0].logprob == pytest.approx(2 - log_z, abs=1e-6)
    assert [t for t, _ in lps[0].top] == [2, 1]
    assert lps[0].top[0][1] == pytest.approx(3 - log_z, abs=1e-6)


def test_greedy_ignores_seed_and_picks_argmax():
    tokens, lps = sample(
        LOGITS.repeat(2, 1),
        [_seq(SamplingParams(temperature=0.0)), _seq(SamplingParams(temperature=0.0), seed=9)],
    )
    assert tokens == [0, 0] and lps == [None, None]


# Tokens that the per-row sampler (the exponential race before it was vectorized, at the merge
# of issues 10 and 12) drew for the rows built by `_mixed_batch`: greedy, temperature, top-k,
# top-p, min-p and penalties side by side.
BEFORE_VECTORIZED = [
    [27, 25, 39, 13, 6, 37, 55, 11, 40, 8, 31, 56],
    [32, 29, 39, 13, 35, 37, 57, 7, 40, 8, 31, 56],
    [27, 29, 39, 13, 6, 37, 7, 11, 40, 8, 31, 56],
]
MIXED_PARAMS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.0, repetition_penalty=1.5),
    dict(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.4),
    dict(temperature=2.0, top_k=20, top_p=0.9, min_p=0.02),
]


def _mixed_batch(shift: int) -> list[Sequence]:
    seqs = []
    for r in range(12):
        params = SamplingParams(**MIXED_PARAMS[(r + shift) % len(MIXED_PARAMS)])
        g = torch.Generator().manual_seed(r)
        tokens = torch.randint(0, 64, (5 + r,), generator=g).tolist()
        seqs.append(Sequence(f"s{r}", tokens, 3, params, seed=1000 + 7 * r))
    return seqs


@pytest.mark.parametrize("shift", range(3))
def test_vectorized_sampler_draws_the_tokens_the_per_row_sampler_drew(shift):
    logits = torch.randn(12, 64, generator=torch.Generator().manual_seed(2026)) * 3
    assert sample(logits, _mixed_batch(shift))[0] == BEFORE_VECTORIZED[shift]


def test_greedy_batch_takes_the_argmax_without_sorting(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("a greedy batch sorted the vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    seqs = [_seq(SamplingParams(temperature=0.0), seed=i) for i in range(8)]
    assert sample(logits, seqs)[0] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e-310, 1e-30, 9.9e-6])
def test_temperature_below_1e_5_decodes_greedily(temperature):
    # NOTE: 1e-310 is 0 in float32; dividing by it once made NaN probabilities, which drew
    # token 0 whatever the logits said.
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 2
    seqs = [_seq(SamplingParams(temperature=temperature), seed=s) for s in range(4)]
    assert sample(logits.repeat(4, 1), seqs)[0] == [int(logits.argmax())] * 4


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-9])
def test_top_p_too_small_to_keep_a_token_keeps_the_most_likely_one(top_p):
    params = SamplingParams(temperature=1.0, top_p=top_p)
    probs, order = _filtered_probs(LOGITS.repeat(3, 1), [_seq(params)] * 3)
    assert (probs > 0).sum(-1).tolist() == [1, 1, 1], "top_p cut every token"
    assert order[:, 0].tolist() == [0, 0, 0]
    seqs = [_seq(params, [0] * (1 + i)) for i in range(50)]
    assert set(sample(LOGITS.repeat(50, 1), seqs)[0]) == {0}


def test_rows_that_truncate_nothing_draw_without_sorting_and_as_the_sorted_race_would(
    monkeypatch,
):
    logits = torch.randn(16, 500, generator=torch.Generator().manual_seed(7)) * 2
    # top_k of the whole vocabulary keeps every token, yet takes the sorted path
    sorted_path = [_seq(SamplingParams(temperature=0.8, top_k=500), seed=s) for s in range(16)]
    expected = sample(logits, sorted_path)[0]

    def no_sort(*args, **kwargs):
        raise AssertionError("a row that truncates nothing sorted the vocabulary")

    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    plain = [_seq(SamplingParams(temperature=0.8), seed=s) for s in range(16)]
    assert sample(logits, plain)[0] == expected
