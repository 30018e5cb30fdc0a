"""The global radix index and its feed, driven by synthetic KV event batches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pdserve.api.block_hash import block_hashes
from pdserve.api.kv_events import (
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVSnapshot,
    WorkerLoad,
    encode_batch,
    encode_snapshot,
)
from pdserve.router.index import RadixIndex
from pdserve.router.kv_feed import KVFeed

SALT = 7
LOAD = WorkerLoad(running=0, waiting=0, free_blocks=100, total_blocks=100)


def chain(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, 4, SALT)


PROMPT = chain(list(range(40)))  # 10 blocks


def stored(hashes: list[int]) -> tuple[BlockStored, ...]:
    parents = [None, *hashes[:-1]]
    return tuple(BlockStored(h, p) for h, p in zip(hashes, parents))


def batch(worker: str, seq: int, events=(), epoch: int = 1, load: WorkerLoad = LOAD):
    return KVEventBatch(worker, epoch, seq, tuple(events), load)


def snapshot(worker: str, seq: int, hashes: list[int], epoch: int = 1, load=LOAD):
    return KVSnapshot(worker, epoch, seq, stored(hashes), load)


def synced(*workers: str) -> RadixIndex:
    index = RadixIndex()
    for w in workers:
        index.resync(snapshot(w, 0, []))
    return index


def test_batches_applied_in_order_give_each_worker_its_leading_blocks():
    index = synced("decode-0", "decode-1")
    assert index.apply(batch("decode-0", 1, stored(PROMPT[:6])))
    assert index.apply(batch("decode-1", 1, stored(PROMPT[:3])))
    assert index.apply(batch("decode-0", 2, stored(PROMPT[6:8])))
    assert index.match(PROMPT) == {"decode-0": 8, "decode-1": 3}
    assert index.match(chain(list(range(100, 140)))) == {}
    assert index.match([]) == {}


def test_a_prompt_that_diverges_matches_only_the_shared_blocks():
    index = synced("prefill-0")
    index.apply(batch("prefill-0", 1, stored(PROMPT)))
    other = chain(list(range(20)) + [999] * 20)
    assert index.match(other) == {"prefill-0": 5}


def test_removed_blocks_shorten_the_match_and_leave_other_workers_alone():
    index = synced("decode-0", "decode-1")
    index.apply(batch("decode-0", 1, stored(PROMPT)))
    index.apply(batch("decode-1", 1, stored(PROMPT)))
    index.apply(batch("decode-0", 2, [BlockRemoved(h) for h in PROMPT[4:]]))
    assert index.match(PROMPT) == {"decode-0": 4, "decode-1": 10}
    assert len(index) == 14


def test_a_gap_applies_nothing_and_asks_for_a_snapshot():
    index = synced("decode-0")
    index.apply(batch("decode-0", 1, stored(PROMPT[:2])))
    assert not index.apply(batch("decode-0", 3, stored(PROMPT[2:4])))
    assert index.match(PROMPT) == {"decode-0": 2}


def test_a_snapshot_replaces_the_workers_blocks_and_covers_earlier_batches():
    index = synced("decode-0", "decode-1")
    index.apply(batch("decode-0", 1, stored(PROMPT[:2])))
    index.apply(batch("decode-1", 1, stored(PROMPT[:9])))
    index.resync(snapshot("decode-0", 5, PROMPT[:6]))
    assert index.apply(batch("decode-0", 4, stored(PROMPT)))  # covered: dropped
    assert index.match(PROMPT) == {"decode-0": 6, "decode-1": 9}
    assert index.apply(batch("decode-0", 6, stored(PROMPT[6:7])))
    assert index.match(PROMPT)["decode-0"] == 7


def test_a_new_epoch_asks_for_a_snapshot_even_when_seq_follows():
    index = synced("decode-0")
    index.apply(batch("decode-0", 1, stored(PROMPT)))
    assert not index.apply(batch("decode-0", 1, stored(PROMPT[:1]), epoch=2))
    assert not index.apply(batch("decode-0", 2, epoch=2))


def test_an_unknown_worker_asks_for_a_snapshot_first():
    assert not RadixIndex().apply(batch("decode-0", 1, stored(PROMPT)))


def test_a_removed_worker_drops_its_blocks_and_load():
    index = synced("decode-0", "decode-1")
    index.apply(batch("decode-0", 1, stored(PROMPT)))
    index.apply(batch("decode-1", 1, stored(PROMPT[:5])))
    index.remove_worker("decode-0")
    assert index.match(PROMPT) == {"decode-1": 5}
    assert set(index.loads) == {"decode-1"}
    assert len(index) == 5


def test_the_latest_load_of_each_worker_is_kept():
    index = synced("decode-0")
    busy = WorkerLoad(running=5, waiting=2, free_blocks=10, total_blocks=100)
    index.apply(batch("decode-0", 1, load=busy))
    assert index.loads["decode-0"] == busy


def test_many_workers_each_get_their_own_count():
    workers = [f"decode-{i}" for i in range(70)]
    index = synced(*workers)
    for i, w in enumerate(workers):
        index.apply(batch(w, 1, stored(PROMPT[: i % 11])))
    counts = index.match(PROMPT)
    assert counts == {w: i % 11 for i, w in enumerate(workers) if i % 11}


class Publisher:
    """A worker's KV events as the feed sees them: encoded batches, then an open stream
    (`drained` is set), and snapshots of what the batches published so far hold."""

    def __init__(self, worker: str, batches: list[KVEventBatch], end: bool = False) -> None:
        self.worker = worker
        self.batches = batches
        self.end = end
        self.published = 0
        self.snapshots_taken = 0
        self.failing_snapshots = 0
        self.drained = asyncio.Event()

    async def events(self) -> AsyncIterator[bytes]:
        for b in self.batches:
            self.published += 1
            yield encode_batch(b)
        self.drained.set()
        if not self.end:
            await asyncio.Event().wait()

    async def snapshot(self) -> bytes:
        self.snapshots_taken += 1
        if self.snapshots_taken <= self.failing_snapshots:
            raise ConnectionError("the worker is busy")
        last = self.batches[self.published - 1]
        held: list[int] = []
        for b in self.batches[: self.published]:
            for e in b.events if b.epoch == last.epoch else ():
                if isinstance(e, BlockStored):
                    held.append(e.block_hash)
                else:
                    held.remove(e.block_hash)
        return encode_snapshot(snapshot(self.worker, last.seq, held, last.epoch))


def run_feed(index: RadixIndex, publisher: Publisher) -> dict[str, int]:
    """Feeds the index until the publisher has nothing more to say; the match of PROMPT then."""

    async def run() -> dict[str, int]:
        kv_feed = KVFeed(index, {publisher.worker: publisher})
        kv_feed.start()
        await publisher.drained.wait()
        for _ in range(10):  # let the feed's task take the last batch
            await asyncio.sleep(0)
        counts = index.match(PROMPT)
        await kv_feed.stop()
        return counts

    return asyncio.run(run())


def test_the_feed_resyncs_on_first_sight_and_after_a_gap():
    publisher = Publisher(
        "decode-0",
        [
            batch("decode-0", 3, stored(PROMPT[:4])),
            batch("decode-0", 4, stored(PROMPT[4:6])),
            batch("decode-0", 7, stored(PROMPT[6:8])),
            batch("decode-0", 8, [BlockRemoved(PROMPT[7])]),
        ],
    )
    assert run_feed(RadixIndex(), publisher) == {"decode-0": 7}
    assert publisher.snapshots_taken == 2


def test_the_feed_resyncs_when_a_worker_restarts_with_a_new_epoch():
    publisher = Publisher(
        "decode-0",
        [
            batch("decode-0", 1, stored(PROMPT)),
            batch("decode-0", 1, stored(PROMPT[:3]), epoch=2),
            batch("decode-0", 2, stored(PROMPT[3:5]), epoch=2),
        ],
    )
    assert run_feed(RadixIndex(), publisher) == {"decode-0": 5}
    assert publisher.snapshots_taken == 2


def test_a_worker_whose_events_end_leaves_the_index():
    index = RadixIndex()
    publisher = Publisher("decode-0", [batch("decode-0", 1, stored(PROMPT))], end=True)
    assert run_feed(index, publisher) == {}
    assert len(index) == 0


def test_a_failed_snapshot_is_retried_before_the_worker_is_dropped():
    publisher = Publisher("decode-0", [batch("decode-0", 1, stored(PROMPT))])
    publisher.failing_snapshots = 2
    assert run_feed(RadixIndex(), publisher) == {"decode-0": len(PROMPT)}
    assert publisher.snapshots_taken == 3
