from __future__ import annotations

import asyncio

import pytest

from kilnproxy.ssh.spread import Spread


async def _one_pass() -> None:
    """Let the loop run the callbacks scheduled so far (call_soon runs on the next pass)."""
    await asyncio.sleep(0)


def test_work_is_done_in_order_a_batch_a_pass() -> None:
    asyncio.run(_work_is_done_in_order_a_batch_a_pass())


async def _work_is_done_in_order_a_batch_a_pass() -> None:
    spread, done = Spread(3), []
    for i in range(8):
        spread.add(lambda i=i: done.append(i))  # type: ignore[misc]
    assert done == [] and len(spread) == 8  # nothing in the pass that added it
    await _one_pass()
    assert done == [0, 1, 2]
    await _one_pass()
    assert done == [0, 1, 2, 3, 4, 5]
    await _one_pass()
    assert done == list(range(8)) and len(spread) == 0
    spread.add(lambda: done.append(8))  # scheduled again once it had run dry
    await _one_pass()
    assert done == list(range(9))


def test_run_all_does_what_is_left_now() -> None:
    asyncio.run(_run_all_does_what_is_left_now())


async def _run_all_does_what_is_left_now() -> None:
    spread, done = Spread(2), []
    for i in range(5):
        spread.add(lambda i=i: done.append(i))  # type: ignore[misc]
    spread.run_all()
    assert done == [0, 1, 2, 3, 4]
    await _one_pass()  # the pass already scheduled finds nothing to do
    assert done == [0, 1, 2, 3, 4]


def test_work_that_raises_is_logged_and_the_rest_done(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in one item (an access line that cannot be written) must not cost the others:
    neither in a pass, nor in `run_all`, the worker's last chance to log them."""
    asyncio.run(_work_that_raises_is_logged_and_the_rest_done())
    failures = [r for r in caplog.records if r.message.startswith("failed to finish")]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == ["one item failed"] * 2


async def _work_that_raises_is_logged_and_the_rest_done() -> None:
    loop = asyncio.get_running_loop()
    escaped: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context["exception"]))
    spread, done = Spread(10), []

    def fail() -> None:
        raise RuntimeError("one item failed")

    spread.add(fail)
    spread.add(lambda: done.append("after"))
    await _one_pass()
    assert done == ["after"]
    spread.add(fail)
    spread.add(lambda: done.append("at exit"))
    spread.run_all()
    assert done == ["after", "at exit"] and escaped == []


@pytest.mark.parametrize("per_pass", [1, 200])
def test_a_burst_never_runs_more_than_per_pass_in_one_pass(per_pass: int) -> None:
    async def burst() -> list[int]:
        spread, sizes, done = Spread(per_pass), [], [0]
        for _ in range(1000):
            spread.add(lambda: done.__setitem__(0, done[0] + 1))
        while len(spread):
            before = done[0]
            await _one_pass()
            sizes.append(done[0] - before)
        return sizes

    sizes = asyncio.run(burst())
    assert sum(sizes) == 1000 and max(sizes) == per_pass
