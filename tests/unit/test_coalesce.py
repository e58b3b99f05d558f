from __future__ import annotations

import asyncio
import sys

from kilnproxy.ssh.coalesce import LARGE, Coalescer


async def _one_pass() -> None:
    """Let the loop run the callbacks scheduled so far (call_soon runs on the next pass)."""
    await asyncio.sleep(0)


def _coalescer() -> tuple[Coalescer, list[bytes]]:
    """A coalescer on the running loop, and the list of the writes it makes."""
    writes: list[bytes] = []
    return Coalescer(writes.append, asyncio.get_running_loop(), _never), writes


def _never() -> None:
    raise AssertionError("a write failed")


def test_chunks_of_one_pass_become_one_write() -> None:
    asyncio.run(_chunks_of_one_pass_become_one_write())


async def _chunks_of_one_pass_become_one_write() -> None:
    coalescer, writes = _coalescer()
    for piece in (b"one ", b"two ", b"three"):
        coalescer.add(piece)
    assert writes == []  # nothing before the pass that delivered them is over
    await _one_pass()
    assert writes == [b"one two three"]
    coalescer.add(b"four")
    await _one_pass()
    assert writes == [b"one two three", b"four"]


def test_a_single_chunk_is_written_as_it_came() -> None:
    asyncio.run(_a_single_chunk_is_written_as_it_came())


async def _a_single_chunk_is_written_as_it_came() -> None:
    coalescer, writes = _coalescer()
    chunk = b"x" * 65536
    coalescer.add(chunk)
    await _one_pass()
    assert writes[0] is chunk  # no copy


def test_large_chunks_are_written_as_they_came_and_small_ones_joined_between() -> None:
    asyncio.run(_large_chunks_are_written_as_they_came())


async def _large_chunks_are_written_as_they_came() -> None:
    coalescer, writes = _coalescer()
    first, second = b"a" * LARGE, b"b" * (4 * LARGE)
    for piece in (b"x", b"y", first, second, b"z"):
        coalescer.add(piece)
    await _one_pass()
    assert writes == [b"xy", first, second, b"z"]
    assert writes[1] is first and writes[2] is second  # no copy of an agent's frame


def test_flush_writes_now_and_the_scheduled_pass_writes_nothing_twice() -> None:
    asyncio.run(_flush_writes_now_and_the_scheduled_pass_writes_nothing_twice())


async def _flush_writes_now_and_the_scheduled_pass_writes_nothing_twice() -> None:
    coalescer, writes = _coalescer()
    coalescer.add(b"before ")
    coalescer.add(b"stderr")
    coalescer.flush()
    assert writes == [b"before stderr"]
    await _one_pass()
    assert writes == [b"before stderr"]
    coalescer.flush()
    assert writes == [b"before stderr"]


def test_discard_drops_what_was_gathered() -> None:
    asyncio.run(_discard_drops_what_was_gathered())


async def _discard_drops_what_was_gathered() -> None:
    coalescer, writes = _coalescer()
    coalescer.add(b"for a client that left")
    coalescer.discard()
    await _one_pass()
    assert writes == []
    coalescer.add(b"later")
    await _one_pass()
    assert writes == [b"later"]


def test_a_write_that_fails_a_pass_later_is_its_owners_to_handle() -> None:
    asyncio.run(_a_write_that_fails_a_pass_later_is_its_owners_to_handle())


async def _a_write_that_fails_a_pass_later_is_its_owners_to_handle() -> None:
    failures: list[str] = []

    def write(data: bytes) -> None:
        raise BrokenPipeError("a bug")

    def failed() -> None:
        failures.append(repr(sys.exc_info()[1]))

    coalescer = Coalescer(write, asyncio.get_running_loop(), failed)
    coalescer.add(b"lost")
    await _one_pass()
    assert failures == ["BrokenPipeError('a bug')"]
