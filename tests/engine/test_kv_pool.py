"""The block pool: allocation, reference counts, and refusing what it cannot give."""

from __future__ import annotations

import pytest

from pdserve.api.errors import CapacityExceeded
from pdserve.engine.kv_pool import BlockPool


def test_shared_block_returns_to_the_pool_after_its_last_reference():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.incref(blocks[:1])
    pool.free(blocks)
    assert pool.num_free == 3 and pool.ref_count(blocks[0]) == 1
    pool.free(blocks[:1])
    assert pool.num_free == 4 and pool.ref_count(blocks[0]) == 0


def test_allocating_more_than_is_free_is_refused_and_takes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(CapacityExceeded):
        pool.allocate(2)
    assert pool.num_free == 1


def test_double_free_and_sharing_a_free_block_are_errors():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError):
        pool.free([block])
    with pytest.raises(ValueError):
        pool.incref([block])
