"""The Docker driver's reading of a box's ready line from the engine's multiplexed output stream.

Over a real socket pair, frames as the engine sends them for a container without a TTY: one byte
of stream (1 stdout, 2 stderr), three zero bytes, four bytes of big-endian length, the payload.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from corral.box.__main__ import READY_MARK
from corral.drivers.docker import _READY_MARK, DockerDriver



def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


async def read(chunks: list[bytes], close: bool, timeout: float = 5.0) -> tuple[bool, str]:
    ours, theirs = socket.socketpair()
    reading = asyncio.ensure_future(DockerDriver._read_ready_line(ours, timeout))
    for chunk in chunks:
        theirs.sendall(chunk)
        await asyncio.sleep(0.01)
    if close:
        theirs.close()
    try:
        return await reading
    finally:
        if not close:
            theirs.close()


def test_the_driver_and_the_box_agree_on_the_mark() -> None:
    assert _READY_MARK == READY_MARK.encode()


async def test_the_line_is_found_across_frames_and_chunks_after_other_output() -> None:
    stream = (frame(2, b"a warning on stderr\n") + frame(1, b"some output\n" + READY_MARK.encode()[:5])
              + frame(1, READY_MARK.encode()[5:] + b' {"port": 8000, "pid": 7}\n'))
    # delivered in awkward pieces: a frame header split in two, a payload split across reads
    chunks = [stream[:3], stream[3:17], stream[17:40], stream[40:]]
    assert await read(chunks, close=False) == (True, "")


async def test_a_box_that_exits_first_ends_the_read_with_its_output() -> None:
    ok, output = await read([frame(2, b"Fatal Python error: init_fs_encoding\n"), frame(1, b"bye\n")], close=True)
    assert not ok and "Fatal Python error" in output and "bye" in output


async def test_a_silent_box_ends_the_read_at_the_timeout() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ok, output = await read([frame(1, b"still starting\n")], close=False, timeout=0.3)
    assert not ok and output == "still starting\n" and loop.time() - t0 < 3


async def test_the_stdout_mark_only_counts_at_the_start_of_a_stdout_line() -> None:
    chunks = [frame(2, READY_MARK.encode() + b" on stderr\n"), frame(1, b"echo " + READY_MARK.encode() + b"\n")]
    ok, output = await read(chunks, close=True)
    assert not ok and "on stderr" in output
