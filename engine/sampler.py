"""Turns one step's logits into tokens: penalties, temperature, top-k/top-p/min-p, logprobs.

Randomness: the token at absolute position p of a sequence with seed s is drawn by inverse
transform sampling with one uniform number `u = uniform(s, p)`. Nothing else feeds the draw,
so a batch's composition never changes a sequence's tokens, and a request resumed from
(prompt, generated tokens, seed) continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from pdserve.api.messages import TokenLogprobs
from pdserve.engine.sequence import Sequence

_MASK64 = (1 << 64) - 1


def uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, position) (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) * (1.0 / (1 << 53))


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output (Hugging Face's rule: divide positive logits,
    multiply negative ones); presence and frequency penalties over the output only (OpenAI's
    rule). Modifies and returns `logits` for the rows whose parameters ask for it."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.uses_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output:
            out = torch.tensor(seq.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _filtered_probs(logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted in descending order with top-k/top-p/min-p cut to zero, and the
    token id of each sorted column."""
    dev = logits.device
    temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=dev)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    vocab = probs.shape[-1]
    top_k = torch.tensor([s.params.top_k or vocab for s in seqs], device=dev)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=dev)
    rank = torch.arange(vocab, device=dev)
    cut = rank[None, :] >= top_k[:, None]
    # NOTE: a token is kept while the mass before it is below top_p, so the most likely token
    # always survives and the kept set is the smallest whose mass reaches top_p.
    cut |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    cut |= probs < min_p[:, None] * probs[:, :1]
    return probs.masked_fill(cut, 0.0), order


def sample(
    logits: torch.Tensor, seqs: Seq[Sequence]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Samples one token for each row of `logits` (`[len(seqs), vocab]`, float32).

    Each sequence's next token sits at absolute position `seq.num_tokens`. Logprobs, when asked,
    are those of the model's own distribution (before penalties and temperature)."""
    raw = logits
    if any(s.params.uses_penalties for s in seqs):
        logits = apply_penalties(logits.clone(), seqs)
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        sub = [seqs[i] for i in sampled_rows]
        probs, order = _filtered_probs(logits[sampled_rows], sub)
        cdf = probs.cumsum(-1)
        u = torch.tensor(
            [uniform(s.seed, s.num_tokens) for s in sub], dtype=cdf.dtype, device=cdf.device
        )
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
        pick = pick.clamp_(max=probs.shape[-1] - 1)
        tokens[sampled_rows] = order.gather(1, pick).squeeze(1)
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, seqs, token_list)


def _logprobs(
    raw: torch.Tensor, seqs: Seq[Sequence], tokens: list[int]
) -> list[TokenLogprobs | None]:
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(seqs)
    if not wanted:
        return result
    logp = torch.log_softmax(raw[wanted], dim=-1)
    for row, i in enumerate(wanted):
        n = seqs[i].params.logprobs
        top = ()
        if n:
            vals, ids = logp[row].topk(n)
            top = tuple(zip(ids.tolist(), vals.tolist()))
        result[i] = TokenLogprobs(tokens[i], float(logp[row, tokens[i]]), top)
    return result
