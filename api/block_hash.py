"""Block hashes: the names of KV blocks that every part of the cluster agrees on.

`h_i = H(h_{i-1}, tokens of block i)` with `h_{-1}` the model's salt, so a hash names a whole
prefix, not one block: two workers holding block hash h hold the same tokens from position 0.
H is xxh3-64 seeded with the previous hash over the block's token ids as little-endian uint32,
stable across processes and machines (never Python's `hash()`). Only full blocks are hashed.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from pathlib import Path

import xxhash

_BIG_ENDIAN = sys.byteorder == "big"


def block_hashes(
    token_ids: Sequence[int], block_size: int, salt: int, parent: int | None = None
) -> list[int]:
    """The hashes of the full blocks of `token_ids`. `parent` continues a chain: the hash of
    the block before `token_ids[0]` (which must then start at a block boundary)."""
    n = len(token_ids) // block_size
    if n == 0:
        return []
    words = array("I", token_ids[: n * block_size])
    if _BIG_ENDIAN:
        words.byteswap()
    data = memoryview(words.tobytes())
    step = 4 * block_size
    h = salt if parent is None else parent
    out = []
    digest = xxhash.xxh3_64_intdigest
    for i in range(0, n * step, step):
        h = digest(data[i : i + step], h)
        out.append(h)
    return out


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def model_salt(model_dir: str | Path, dtype: str, block_size: int) -> int:
    """A per-model seed for the chain: KV of the same tokens differs between models and dtypes,
    so their blocks must never share a name. Read from the model's `config.json` bytes, so the
    router (torch-free) and every worker derive the same value."""
    config = Path(model_dir, "config.json").read_bytes()
    return xxhash.xxh3_64_intdigest(config + f"|{dtype}|{block_size}".encode())
