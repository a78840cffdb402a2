"""`EngineLoop.call` past its timeout, on a real engine: a call that had not started never runs; one
that ran late is undone in the loop thread. Either way no block stays allocated."""

from __future__ import annotations

import threading
import time

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.loop import CallTimeout, EngineLoop
from splitserve.model import load


@pytest.fixture(scope="module")
def loop(tiny_checkpoint):
    lp = EngineLoop(Engine(load(tiny_checkpoint), EngineConfig(num_blocks=32, block_size=8))).start()
    yield lp
    lp.stop()


def until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_a_call_that_never_started_is_cancelled(loop) -> None:
    free = loop.engine.blocks.num_free
    gate = threading.Event()
    busy = threading.Thread(target=loop.call, args=(lambda e: gate.wait(5),))
    busy.start()
    assert until(lambda: loop._calls.empty())  # the loop thread is inside the blocking call
    ran = []
    with pytest.raises(CallTimeout) as e:
        loop.call(lambda eng: ran.append(eng.reserve(40)), timeout=0.05, undo=lambda eng, _: None)
    assert not e.value.ran
    gate.set()
    busy.join(5)
    loop.call(lambda e: None)  # the queue has drained past the cancelled call
    assert ran == [] and loop.engine.blocks.num_free == free


def test_a_late_reserve_is_undone(loop) -> None:
    free = loop.engine.blocks.num_free
    gate = threading.Event()

    def slow_reserve(eng: Engine):
        gate.wait(5)
        return eng.reserve(40)  # 5 blocks, after the caller gave up

    with pytest.raises(CallTimeout) as e:
        loop.call(slow_reserve, timeout=0.05, undo=lambda eng, blocks: eng.release_blocks(blocks))
    assert e.value.ran
    gate.set()
    assert until(lambda: loop.engine.blocks.num_free == free)


def test_a_call_in_time_is_not_undone(loop) -> None:
    free = loop.engine.blocks.num_free
    undone = []
    blocks = loop.call(lambda eng: eng.reserve(16), timeout=5, undo=lambda eng, b: undone.append(b))
    loop.call(lambda e: None)
    assert len(blocks) == 2 and undone == [] and loop.engine.blocks.num_free == free - 2
    loop.call(lambda eng: eng.release_blocks(blocks))
    assert loop.engine.blocks.num_free == free


def test_submit_returns_before_the_call_runs(loop) -> None:
    """`submit` (the prefill worker's cleanup after a delivered cache) queues the call without waiting:
    it returns while the loop thread is busy, and the call runs once the loop gets to it."""
    free = loop.engine.blocks.num_free
    blocks = loop.call(lambda eng: eng.reserve(16))
    gate = threading.Event()
    busy = threading.Thread(target=loop.call, args=(lambda e: gate.wait(5),))
    busy.start()
    assert until(lambda: loop._calls.empty())  # the loop thread is inside the blocking call
    fut = loop.submit(lambda eng: eng.release_blocks(blocks))
    assert not fut.done() and loop.engine.blocks.num_free == free - 2
    gate.set()
    busy.join(5)
    fut.result(5)
    assert loop.engine.blocks.num_free == free
