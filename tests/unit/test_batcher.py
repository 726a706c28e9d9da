"""The client's Batcher: concurrent calls go out as one, in order; failures and cancellations are not lost."""

from __future__ import annotations

import asyncio

import pytest

from corral.manager._async._rt import Batcher
from corral.manager._sync._rt import Batcher as SyncBatcher


def test_calls_made_together_go_as_one_batch_in_order():
    sent = []

    async def main():
        gate = asyncio.Event()

        async def send(items):
            sent.append(list(items))
            if len(sent) == 1:
                await gate.wait()  # the first batch stays in flight while more calls come
            return [i * 10 for i in items]

        b = Batcher(send)
        first = asyncio.gather(*(b(i) for i in range(5)))
        await asyncio.sleep(0.01)
        second = asyncio.gather(*(b(i) for i in (100, 101, 102)))
        await asyncio.sleep(0.01)
        assert sent == [[0, 1, 2, 3, 4]]  # nothing more goes out while a batch is in flight
        gate.set()
        return await first, await second

    first, second = asyncio.run(main())
    assert first == [0, 10, 20, 30, 40] and second == [1000, 1010, 1020]
    assert sent == [[0, 1, 2, 3, 4], [100, 101, 102]]


def test_a_failed_call_fails_every_caller_of_its_batch_and_the_next_batch_still_goes():
    calls = 0

    async def send(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("registry gone")
        return list(items)

    async def main():
        b = Batcher(send)
        got = await asyncio.gather(*(b(i) for i in range(3)), return_exceptions=True)
        return got, await b(7)

    got, after = asyncio.run(main())
    assert all(isinstance(g, RuntimeError) and "registry gone" in str(g) for g in got)
    assert after == 7


def test_a_caller_cancelled_in_flight_hands_its_result_to_orphan():
    orphans = []

    async def main():
        gate = asyncio.Event()

        async def send(items):
            await gate.wait()
            return [f"box-{i}" for i in items]

        b = Batcher(send, orphan=orphans.append)
        keep = asyncio.ensure_future(b(1))
        drop = asyncio.ensure_future(b(2))
        await asyncio.sleep(0.01)
        drop.cancel()
        gate.set()
        return await keep

    assert asyncio.run(main()) == "box-1"
    assert orphans == ["box-2"]  # never a sandbox bound to nobody


def test_a_new_event_loop_starts_afresh():
    async def send(items):
        return [i + 1 for i in items]

    b = Batcher(send)
    assert asyncio.run(b(1)) == 2
    assert asyncio.run(b(2)) == 3  # the batch task of the first loop is gone; no hang


def test_the_sync_twin_sends_each_call_alone():
    sent = []
    b = SyncBatcher(lambda items: sent.append(items) or [i * 2 for i in items])
    assert b(3) == 6 and b(4) == 8
    assert sent == [[3], [4]]


@pytest.mark.parametrize("n", [1, 300])
def test_large_bursts_are_split_at_max_batch(n):
    sizes = []

    async def send(items):
        sizes.append(len(items))
        return list(items)

    async def main():
        b = Batcher(send)
        return await asyncio.gather(*(b(i) for i in range(n)))

    assert asyncio.run(main()) == list(range(n))
    assert sum(sizes) == n and max(sizes) <= 256
