"""The length-prefixed JSON framing of worker/protocol.py, over real pipes."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from worker import protocol
from worker.protocol import (
    MAX_FRAME_SIZE,
    MAX_TASK_SIZE,
    FrameReader,
    Outbox,
    ProtocolError,
    encode,
    oversize,
    write_all,
    write_frame,
)

pytestmark = pytest.mark.timeout(30)

MESSAGES = [
    {"op": "run", "task": "tasks.resize", "args": [42], "kwargs": {}},
    [1, 2.5, None, True, "x"],
    "ünïcödé and a lone surrogate \udc80",
    0,
    {},
]


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.mark.parametrize("task_id", ["plain", "r\nx", "a\x1fcancel b", "é\r"])
def test_an_id_on_the_revoke_pipe_is_one_line_whatever_it_holds(task_id: str) -> None:
    line = protocol.id_line(task_id, protocol.CANCEL_MARK)
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and line.count(b"\x1f") == 1
    assert protocol.line_id(line[len(protocol.CANCEL_MARK) : -1]) == task_id
    assert protocol.line_id(b"not json") == protocol.line_id(b"5") == ""


def test_frame_is_a_big_endian_length_then_compact_json() -> None:
    assert encode({"a": [1, 2]}) == b'\x00\x00\x00\x0b{"a":[1,2]}'


def test_frames_fed_one_byte_at_a_time_come_out_whole_and_in_order() -> None:
    stream = b"".join(encode(message) for message in MESSAGES)
    reader = FrameReader()
    out = []
    for i in range(len(stream)):
        out.extend(reader.feed(stream[i : i + 1]))
    assert out == MESSAGES


def test_many_frames_in_one_chunk_all_come_out() -> None:
    frames = [{"n": n} for n in range(1000)]
    assert FrameReader().feed(b"".join(encode(frame) for frame in frames)) == frames


def test_a_chunk_split_inside_the_header_keeps_the_rest_for_later() -> None:
    stream = encode(MESSAGES[0]) + encode(MESSAGES[1])
    cut = len(encode(MESSAGES[0])) + 2
    reader = FrameReader()
    assert reader.feed(stream[:cut]) == [MESSAGES[0]]
    assert reader.feed(stream[cut:]) == [MESSAGES[1]]
    assert reader.feed(b"") == []


def test_read_frames_returns_frames_then_empty_then_none_at_eof(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.set_blocking(read_fd, False)
    reader = FrameReader()
    assert reader.read_frames(read_fd) == []
    data = encode(MESSAGES[0])
    os.write(write_fd, data[:5])
    assert reader.read_frames(read_fd) == []
    os.write(write_fd, data[5:] + encode(MESSAGES[1]))
    assert reader.read_frames(read_fd) == MESSAGES[:2]
    os.close(write_fd)
    assert reader.read_frames(read_fd) is None


def test_write_frame_delivers_a_frame_larger_than_the_pipe_buffer(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    big = {"blob": "x" * (3 * 1024 * 1024)}
    received: list[object] = []

    def read_all() -> None:
        reader = FrameReader()
        while not received:
            frames = reader.read_frames(read_fd)
            assert frames is not None
            received.extend(frames)

    reader_thread = threading.Thread(target=read_all)
    reader_thread.start()
    write_frame(write_fd, big)
    reader_thread.join(timeout=20)
    assert received == [big]


def test_header_announcing_more_than_64_mib_is_refused_at_once() -> None:
    with pytest.raises(ProtocolError, match="over"):
        FrameReader().feed(struct.pack(">I", MAX_FRAME_SIZE + 1))


def test_encoding_a_frame_over_the_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_FRAME_SIZE", 16)
    assert FrameReader().feed(encode("0123456789abc")) == ["0123456789abc"]
    with pytest.raises(ProtocolError):
        encode("0123456789abcdef")


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe", b"[" * 100_000])
def test_a_frame_that_is_not_json_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        FrameReader().feed(struct.pack(">I", len(body)) + body)


def test_what_json_cannot_hold_is_refused_by_encode() -> None:
    with pytest.raises(TypeError):
        encode({"when": object()})


def test_write_all_finishes_a_write_that_a_signal_cut_short(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    data = b"x" * (1 << 20)  # far past the pipe's buffer: the write sleeps, the signal lands
    received = bytearray()
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)

    def signal_then_read() -> None:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        os.set_blocking(read_fd, False)
        give_up = time.monotonic() + 10  # bounded: a write cut short never sends the rest
        while len(received) < len(data) and time.monotonic() < give_up:
            try:
                received.extend(os.read(read_fd, 1 << 20))
            except BlockingIOError:
                time.sleep(0.01)

    reader = threading.Thread(target=signal_then_read)
    reader.start()
    try:
        write_all(write_fd, data)
    finally:
        reader.join(timeout=20)
        signal.signal(signal.SIGUSR1, previous)
    assert bytes(received) == data


def test_outbox_writes_a_frame_the_fd_takes_at_once_and_keeps_nothing(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    os.set_blocking(write_fd, False)
    outbox = Outbox(write_fd)
    outbox.send(encode(MESSAGES[0]))
    assert not outbox and outbox.size == 0
    assert FrameReader().feed(os.read(read_fd, 65536)) == [MESSAGES[0]]


def test_outbox_keeps_what_a_full_pipe_does_not_take_and_flushes_it_in_order(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    os.set_blocking(write_fd, False)
    os.set_blocking(read_fd, False)
    frames = [{"n": n, "blob": "x" * 100_000} for n in range(5)]  # ~500 KB: many pipefuls
    outbox = Outbox(write_fd)
    for frame in frames:
        outbox.send(encode(frame))  # never blocks
    assert outbox and outbox.size < sum(len(encode(f)) for f in frames)
    reader = FrameReader()
    received: list[object] = []
    deadline = time.monotonic() + 10
    while outbox or len(received) < len(frames):
        received += reader.read_frames(read_fd) or []
        outbox.flush()
        assert time.monotonic() < deadline
    assert received == frames and outbox.size == 0


def test_outbox_writes_added_frames_only_when_flushed_in_order_small_and_large(
    pipe: tuple[int, int],
) -> None:
    """Frames added in a row go out at the flush, the small ones joined (one write, one
    wake-up of the reader), a large one after them; a full pipe keeps the rest."""
    read_fd, write_fd = pipe
    os.set_blocking(write_fd, False)
    os.set_blocking(read_fd, False)
    frames: list[object] = [{"n": n} for n in range(50)]
    frames += [{"blob": "y" * (protocol.JOIN_LIMIT * 3)}, {"n": "last"}]
    outbox = Outbox(write_fd)
    for frame in frames:
        outbox.add(encode(frame))
    assert outbox.size == sum(len(encode(f)) for f in frames)
    with pytest.raises(BlockingIOError):
        os.read(read_fd, 1)  # nothing written before the flush
    reader, received = FrameReader(), []
    deadline = time.monotonic() + 10
    while outbox or len(received) < len(frames):
        outbox.flush()
        received += reader.read_frames(read_fd) or []
        assert time.monotonic() < deadline
    assert received == frames and outbox.size == 0


def test_outbox_leaves_a_gone_reader_to_its_caller(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.set_blocking(write_fd, False)
    os.close(read_fd)
    with pytest.raises(BrokenPipeError):
        Outbox(write_fd).send(encode(MESSAGES[0]))


def test_task_size_counts_utf8_bytes_up_to_the_limit() -> None:
    assert oversize("x" * MAX_TASK_SIZE) is None
    assert oversize("é" * (MAX_TASK_SIZE // 2)) is None  # two bytes each in UTF-8
    reason = oversize("é" * (MAX_TASK_SIZE // 2 + 1))
    assert (
        reason
        == f"the task is {MAX_TASK_SIZE + 2} bytes of JSON, over the {MAX_TASK_SIZE}-byte limit"
    )
