"""Turns one step's logits into tokens: penalties, temperature, top-k/top-p/min-p, logprobs.

Randomness: the token at absolute position p of a sequence with seed s is the winner of an
exponential race (equivalent to the Gumbel-max trick): argmax over tokens t of prob(t) / E(t),
where E(t) ~ Exp(1) is drawn from a hash of (s, p, t) alone. Nothing else feeds the draw, and
every operation below works row by row, so a batch's composition never changes a sequence's
tokens, and a request resumed from (prompt, generated tokens, seed) continues exactly as the
uninterrupted one would have.

NOTE: a resumed request recomputes its KV, which moves logits in the last bits. Inverse
transform sampling (one uniform against the cumulative distribution) flips a token whenever the
uniform falls that close to one of the vocabulary's boundaries: 3 of 18 resumed 200-token runs
of the tiny model diverged. The race flips only when its two leaders tie that closely: none did.

The step is vectorized over the batch (one tensor op per stage, never a loop per row over
the vocabulary), and the only host sync is reading the sampled tokens. A batch with no
sampled rows and no penalties takes the argmax of the logits as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as Seq

import numpy as np
import torch

from pdserve.api.messages import TokenLogprobs
from pdserve.engine.sequence import Sequence

_MASK64 = (1 << 64) - 1


def draw_key(seed: int, position: int) -> int:
    """A 32-bit key that depends only on (seed, position) (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer of int32 lanes read as unsigned.

    NOTE: int32 products wrap modulo 2**32 on every device torch runs on, which is the unsigned
    arithmetic the hash wants; right shifts are masked so that they act as logical shifts."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * (0x85EBCA6B - (1 << 32))
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * (0xC2B2AE35 - (1 << 32))
    return x ^ ((x >> 16) & 0xFFFF)


@functools.cache
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    return _hash32(torch.arange(vocab, dtype=torch.int32, device=device))


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) numbers, `[len(keys), vocab]` float64: entry (r, t) depends only on keys[r] (32-bit
    keys, int64) and t."""
    signed = torch.where(keys >= 1 << 31, keys - (1 << 32), keys).to(torch.int32)
    x = _hash32(signed[:, None] ^ _token_hashes(vocab, keys.device)[None, :])
    unsigned = x.to(torch.float64) + (x < 0).to(torch.float64) * float(1 << 32)
    return -torch.log((unsigned + 0.5) * (1.0 / (1 << 32)))


def _row_values(seqs: Seq[Sequence], name: str, device: torch.device) -> torch.Tensor:
    values = np.fromiter((getattr(s.params, name) for s in seqs), np.float32, len(seqs))
    return torch.from_numpy(values).to(device)


def _token_pairs(
    token_lists: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token id) of every token of every row, as two index tensors."""
    lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
    tokens = np.fromiter(
        (t for tokens in token_lists for t in tokens), np.int64, int(lengths.sum())
    )
    rows = np.repeat(np.arange(len(token_lists)), lengths)
    return torch.from_numpy(rows).to(device), torch.from_numpy(tokens).to(device)


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output (Hugging Face's rule: divide positive logits,
    multiply negative ones); presence and frequency penalties over the output only (OpenAI's
    rule). Modifies and returns `logits` (`[len(seqs), vocab]`); a row whose parameters are
    neutral is left as it was."""
    dev = logits.device
    rows = [i for i, s in enumerate(seqs) if s.params.uses_penalties]
    if not rows:
        return logits
    sub = [seqs[i] for i in rows]
    x = logits[rows]
    penalty = _row_values(sub, "repetition_penalty", dev)[:, None]
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[_token_pairs([s.token_ids for s in sub], dev)] = True
    x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    counts = torch.zeros_like(x)
    pairs = _token_pairs([s.output_ids for s in sub], dev)
    counts.index_put_(pairs, torch.ones(pairs[0].numel(), device=dev), accumulate=True)
    frequency = _row_values(sub, "frequency_penalty", dev)[:, None]
    presence = _row_values(sub, "presence_penalty", dev)[:, None]
    x -= frequency * counts + presence * (counts > 0)
    logits[rows] = x
    return logits


def _filtered_probs(logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted in descending order with top-k/top-p/min-p cut to zero, and the
    token id of each sorted column."""
    dev = logits.device
    probs = torch.softmax(logits / _row_values(seqs, "temperature", dev)[:, None], dim=-1)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    vocab = probs.shape[-1]
    top_k = torch.from_numpy(
        np.fromiter((s.params.top_k or vocab for s in seqs), np.int64, len(seqs))
    ).to(dev)
    rank = torch.arange(vocab, device=dev)
    cut = rank[None, :] >= top_k[:, None]
    # NOTE: a token is kept while the mass before it is below top_p, so the kept set is the
    # smallest whose mass reaches top_p. The most likely token is always kept: a top_p that
    # rounds to 0 in float32 (1e-300) would otherwise cut every token.
    cut |= (probs.cumsum(-1) - probs) >= _row_values(seqs, "top_p", dev)[:, None]
    cut |= probs < _row_values(seqs, "min_p", dev)[:, None] * probs[:, :1]
    cut[:, 0] = False
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
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    # NOTE: the race needs no sorted order, so rows that truncate nothing skip the sort (the
    # costliest stage over a large vocabulary); both ways draw the same token.
    for truncate in (True, False):
        rows = [i for i in sampled if seqs[i].params.truncates == truncate]
        if rows:
            tokens[rows] = _race(logits[rows], [seqs[i] for i in rows], truncate)
    token_list = tokens.tolist()
    return token_list, _logprobs(raw, seqs, token_list)


def _race(logits: torch.Tensor, seqs: Seq[Sequence], truncate: bool) -> torch.Tensor:
    """The token each row draws (see the module's docstring)."""
    keys = np.fromiter((draw_key(s.seed, s.num_tokens) for s in seqs), np.int64, len(seqs))
    noise = exponential_noise(torch.from_numpy(keys).to(logits.device), logits.shape[-1])
    if not truncate:
        temperature = _row_values(seqs, "temperature", logits.device)[:, None]
        probs = torch.softmax(logits / temperature, dim=-1)
        return (probs.to(torch.float64) / noise).argmax(dim=-1)
    probs, order = _filtered_probs(logits, seqs)
    # NOTE: the noise follows the token id, not the sorted rank, so two near-equal tokens that
    # swap ranks keep their own noise.
    pick = (probs.to(torch.float64) / noise.gather(1, order)).argmax(dim=-1, keepdim=True)
    return order.gather(1, pick).squeeze(1)


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
