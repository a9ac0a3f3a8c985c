"""The control plane's transport: ControlServer, ControlClient and key files, over real sockets."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from ctl.client import NODE_SHARE, ControlClient, Result
from supervisor import control as control_module
from supervisor.control import (
    BAD_REQUEST_LOG_INTERVAL,
    DEFAULT_TIMEOUT,
    MAX_FRAME_READ,
    MAX_MESSAGE_SIZE,
    ControlConfigError,
    ControlServer,
    Request,
    events_endpoint,
)
from supervisor.keys import keygen, load_keypair, load_public
from supervisor.throttle import LogThrottle

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[ControlServer, Request], None]


def echo(server: ControlServer, req: Request) -> None:
    if req.cmd == "boom":
        server.reply_error(req, "boom failed")
    else:
        server.reply(req, {"images@h1": {"ok": {"cmd": req.cmd, "args": req.args}}})


@contextlib.contextmanager
def serving(server: ControlServer, handler: Handler = echo) -> Iterator[list[Request]]:
    """Answer requests in a thread, as the arbiter's loop would; yield what it received."""
    received: list[Request] = []
    stop = threading.Event()

    def loop() -> None:
        poller = zmq.Poller()
        for sock in server.sockets():
            poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            for sock, _ in poller.poll(20):
                req = server.recv(sock)
                if req is not None:
                    received.append(req)
                    handler(server, req)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        stop.set()
        thread.join(timeout=5)


def exchange(server: ControlServer, peer: zmq.Socket[bytes], frames: list[bytes]) -> Any:
    """Send raw frames from `peer`, let the server handle what arrives, return the answer."""
    peer.send_multipart(frames)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for sock in server.sockets():
            if sock.poll(10):
                req = server.recv(sock)
                if req is not None:
                    echo(server, req)
        if peer.poll(0):
            return json.loads(peer.recv())
    raise AssertionError("no answer within 5 s")


def free_port_pair() -> int:
    """A port p on 127.0.0.1 with p + 1 free too (control and events)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: unix socket paths are limited to about 100 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fleetd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ipc_endpoint(short_dir: Path) -> str:
    return f"ipc://{short_dir}/run/control.sock"


@pytest.fixture
def ipc_server(ctx: zmq.Context[Any], ipc_endpoint: str) -> Iterator[ControlServer]:
    with ControlServer(ctx, [ipc_endpoint], "", "", "h1") as server:
        yield server


@pytest.fixture
def peer(ctx: zmq.Context[Any], ipc_server: ControlServer, ipc_endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(ipc_endpoint)
    return sock


class Keys:
    def __init__(self, root: Path) -> None:
        self.server_public, self.server_secret = keygen(root / "server")
        self.client_public, self.client_secret = keygen(root / "client")
        self.stranger_public, self.stranger_secret = keygen(root / "stranger")
        self.authorized = root / "authorized"
        self.authorized.mkdir()
        shutil.copy(self.client_public, self.authorized / "alice.key")


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port_pair()}"


@pytest.fixture
def tcp_server(ctx: zmq.Context[Any], keys: Keys, tcp_endpoint: str) -> Iterator[ControlServer]:
    with ControlServer(
        ctx, [tcp_endpoint], keys.server_secret, str(keys.authorized), "h1"
    ) as server:
        yield server


def tcp_client(keys: Keys, endpoint: str, secret_path: str, timeout: float) -> ControlClient:
    return ControlClient(
        [endpoint],
        timeout,
        client_keys=load_keypair(secret_path),
        server_keys={endpoint: load_public(keys.server_public)},
        hosts={endpoint: "h1"},
    )


def test_request_round_trips_over_ipc(ipc_server: ControlServer, ipc_endpoint: str) -> None:
    with serving(ipc_server) as received, ControlClient([ipc_endpoint], 5) as client:
        result = client.call("rate_limit", {"task": "t", "rate": "1/s"}, ["images@h1"])
    assert result.replies == {
        "images@h1": {"ok": {"cmd": "rate_limit", "args": {"task": "t", "rate": "1/s"}}}
    }
    assert result.missing == [] and result.errors == {}
    assert [(req.cmd, req.dest) for req in received] == [("rate_limit", ["images@h1"])]


def test_timeout_and_limit_are_fields_of_the_request_not_arguments(
    ipc_server: ControlServer, ipc_endpoint: str
) -> None:
    with serving(ipc_server) as received, ControlClient([ipc_endpoint], 5) as client:
        client.call("ping", {}, None, limit=2)
        client.call("ping")
    assert [(req.args, req.timeout, req.limit) for req in received] == [
        ({}, 5 * NODE_SHARE, 2),
        ({}, 5 * NODE_SHARE, None),
    ]


def test_a_request_without_timeout_or_limit_gets_the_defaults(
    ipc_server: ControlServer, peer: zmq.Socket[bytes]
) -> None:
    with serving(ipc_server) as received:
        peer.send(b'{"v": 1, "id": "old", "cmd": "ping", "args": {}, "dest": null}')
        peer.send(b'{"v": 1, "id": "nulls", "cmd": "ping", "timeout": null, "limit": null}')
        for _ in range(2):
            assert peer.poll(5000)
            peer.recv()
    assert [(req.timeout, req.limit) for req in received] == [(DEFAULT_TIMEOUT, None)] * 2


def test_reply_carries_version_id_and_host(
    ipc_server: ControlServer, peer: zmq.Socket[bytes]
) -> None:
    request = {"v": 1, "id": "r1", "cmd": "ping", "dest": None}
    reply = exchange(ipc_server, peer, [json.dumps(request).encode()])
    assert reply == {
        "v": 1,
        "id": "r1",
        "host": "h1",
        "replies": {"images@h1": {"ok": {"cmd": "ping", "args": {}}}},
    }


def test_ipc_socket_folder_is_created_0700(ipc_server: ControlServer, short_dir: Path) -> None:
    run = short_dir / "run"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for name in ("control.sock", "events.sock"):
        assert stat.S_ISSOCK((run / name).stat().st_mode)
        assert (run / name).stat().st_mode & 0o077 == 0


def test_existing_ipc_folder_of_ours_is_made_0700(ctx: zmq.Context[Any], short_dir: Path) -> None:
    run = short_dir / "open"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    with ControlServer(ctx, [f"ipc://{run}/control.sock"], "", "", "h1"):
        assert stat.S_IMODE(run.stat().st_mode) == 0o700


def test_stale_socket_file_is_replaced(ctx: zmq.Context[Any], short_dir: Path) -> None:
    path = short_dir / "control.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    with ControlServer(ctx, [f"ipc://{path}"], "", "", "h1") as server:
        with serving(server), ControlClient([f"ipc://{path}"], 5) as client:
            assert client.call("ping").replies


def test_socket_another_process_listens_on_is_refused(
    ctx: zmq.Context[Any], short_dir: Path
) -> None:
    path = short_dir / "control.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ControlConfigError, match="in use"):
            ControlServer(ctx, [f"ipc://{path}"], "", "", "h1")
    assert path.exists()


def test_close_removes_the_socket_files(ctx: zmq.Context[Any], short_dir: Path) -> None:
    ControlServer(ctx, [f"ipc://{short_dir}/control.sock"], "", "", "h1").close()
    assert list(short_dir.iterdir()) == []


@pytest.mark.parametrize(("secret", "authorized"), [("", ""), ("secret", ""), ("", "authorized")])
def test_tcp_bind_without_keys_is_refused(
    ctx: zmq.Context[Any], keys: Keys, tcp_endpoint: str, secret: str, authorized: str
) -> None:
    secret_path = keys.server_secret if secret else ""
    folder = str(keys.authorized) if authorized else ""
    with pytest.raises(ControlConfigError) as refused:
        ControlServer(ctx, [tcp_endpoint], secret_path, folder, "h1")
    message = str(refused.value)
    assert tcp_endpoint in message and "\n" not in message


def test_public_key_file_is_refused_as_the_server_secret(
    ctx: zmq.Context[Any], keys: Keys, tcp_endpoint: str
) -> None:
    with pytest.raises(ControlConfigError, match="secret"):
        ControlServer(ctx, [tcp_endpoint], keys.server_public, str(keys.authorized), "h1")


def test_unsupported_endpoints_are_refused(ctx: zmq.Context[Any]) -> None:
    for endpoint in ("inproc://control", "ipc://@abstract", "tcp://127.0.0.1:*"):
        with pytest.raises(ControlConfigError, match="control endpoint"):
            ControlServer(ctx, [endpoint], "", "", "h1")


def test_events_endpoint_sits_beside_the_control_endpoint() -> None:
    assert events_endpoint("ipc:///x/control.sock") == "ipc:///x/events.sock"
    assert events_endpoint("tcp://0.0.0.0:7950") == "tcp://0.0.0.0:7951"
    assert events_endpoint("tcp://[::1]:7950") == "tcp://[::1]:7951"


def test_authorized_client_is_answered_over_tcp(
    tcp_server: ControlServer, keys: Keys, tcp_endpoint: str
) -> None:
    with serving(tcp_server), tcp_client(keys, tcp_endpoint, keys.client_secret, 5) as client:
        result = client.call("ping")
    assert result.replies == {"images@h1": {"ok": {"cmd": "ping", "args": {}}}}
    assert result.missing == []


def test_unauthorized_client_gets_nothing_and_is_reported_missing(
    tcp_server: ControlServer, keys: Keys, tcp_endpoint: str
) -> None:
    with serving(tcp_server) as received:
        with tcp_client(keys, tcp_endpoint, keys.stranger_secret, 0.5) as client:
            result = client.call("ping")
    assert result.replies == {}
    assert result.missing == ["h1"]
    assert received == []


def test_tcp_events_are_refused_to_an_unauthorized_subscriber(
    tcp_server: ControlServer, keys: Keys, tcp_endpoint: str
) -> None:
    subscriber: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    subscriber.linger = 0
    subscriber.curve_publickey, subscriber.curve_secretkey = load_keypair(keys.stranger_secret)
    subscriber.curve_serverkey = load_public(keys.server_public)
    subscriber.subscribe(b"")
    subscriber.connect(events_endpoint(tcp_endpoint))
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            tcp_server.publish({"event": "task-started"})
            assert not subscriber.poll(20)
    finally:
        subscriber.close()


@pytest.mark.parametrize(
    ("frames", "error", "reply_id"),
    [
        ([b"{not json"], "not JSON", None),
        ([b"\xff\xfe"], "not JSON", None),
        ([b"[1, 2]"], "not a JSON object", None),
        ([b'{"v": 2, "id": "a", "cmd": "ping"}'], '"v"', "a"),
        ([b'{"v": true, "id": "a", "cmd": "ping"}'], '"v"', "a"),
        ([b'{"v": 1, "cmd": "ping"}'], '"id"', None),
        ([b'{"v": 1, "id": 7, "cmd": "ping"}'], '"id"', None),
        ([b'{"v": 1, "id": "a"}'], '"cmd"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "args": [1]}'], '"args"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "dest": "h1"}'], '"dest"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "dest": [1]}'], '"dest"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "timeout": "1"}'], '"timeout"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "timeout": 0}'], '"timeout"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "timeout": -1}'], '"timeout"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "timeout": true}'], '"timeout"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "timeout": NaN}'], '"timeout"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "timeout": Infinity}'], '"timeout"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "limit": 0}'], '"limit"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "limit": 1.5}'], '"limit"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "limit": "2"}'], '"limit"', "a"),
        ([b'{"v": 1, "id": "a", "cmd": "ping", "limit": true}'], '"limit"', "a"),
        ([b"{}", b"{}"], "frame", None),
        ([b"a" * 600_000, b"b" * 600_000], "over 1 MiB", None),
        ([b"[" * 500_000], "not JSON", None),
    ],
)
def test_malformed_request_gets_an_error_reply(
    ipc_server: ControlServer,
    peer: zmq.Socket[bytes],
    frames: list[bytes],
    error: str,
    reply_id: str | None,
) -> None:
    reply = exchange(ipc_server, peer, frames)
    assert set(reply) == {"v", "id", "error"}
    assert reply["v"] == 1 and reply["id"] == reply_id
    assert error in reply["error"] and "\n" not in reply["error"]


def test_a_frame_over_1_mib_gets_an_error_reply_and_a_huge_one_is_dropped(
    ipc_server: ControlServer, peer: zmq.Socket[bytes], ipc_endpoint: str
) -> None:
    """DESIGN: a message over 1 MiB gets an error reply (libzmq dropped the connection of any
    frame over 1 MiB, unanswered); one over MAX_FRAME_READ is not read at all."""
    peer.send(b"x" * (MAX_MESSAGE_SIZE + 1))
    with serving(ipc_server) as received:
        assert peer.poll(5000), "no answer to a frame over 1 MiB"
        answer = json.loads(peer.recv())
        peer.send(b"x" * (MAX_FRAME_READ + 1))
        with ControlClient([ipc_endpoint], 5) as client:
            result = client.call("ping")
    assert "over 1 MiB" in answer["error"]
    assert result.replies and result.missing == []
    assert [req.cmd for req in received] == ["ping"]
    assert not peer.poll(0)


def test_burst_of_garbage_then_a_valid_request_is_answered_fast(
    ipc_server: ControlServer, peer: zmq.Socket[bytes]
) -> None:
    rng = random.Random(7)
    with serving(ipc_server) as received:
        for _ in range(500):
            frames = [rng.randbytes(rng.randrange(0, 2000)) for _ in range(rng.randrange(1, 4))]
            peer.send_multipart(frames)
        start = time.monotonic()
        peer.send(b'{"v": 1, "id": "last", "cmd": "ping"}')
        answers: list[dict[str, Any]] = []
        while not answers or answers[-1].get("id") != "last":
            assert peer.poll(5000)
            answers.append(json.loads(peer.recv()))
        elapsed = time.monotonic() - start
    assert elapsed < 2
    assert len(answers) == 501
    assert all("error" in answer for answer in answers[:-1])
    assert answers[-1]["replies"]
    assert [req.cmd for req in received] == ["ping"]


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_random_bytes_on_the_wire_leave_the_server_working(
    ctx: zmq.Context[Any], keys: Keys, short_dir: Path, tcp_endpoint: str, transport: str
) -> None:
    ipc_endpoint = f"ipc://{short_dir}/control.sock"
    rng = random.Random(11)
    with (
        ControlServer(
            ctx, [ipc_endpoint, tcp_endpoint], keys.server_secret, str(keys.authorized), "h1"
        ) as server,
        serving(server),
    ):
        for _ in range(20):
            if transport == "ipc":
                raw = socket.socket(socket.AF_UNIX)
                raw.connect(ipc_endpoint[len("ipc://") :])
            else:
                raw = socket.create_connection(("127.0.0.1", int(tcp_endpoint.rsplit(":", 1)[1])))
            with raw:
                with contextlib.suppress(OSError):
                    raw.sendall(rng.randbytes(rng.randrange(1, 100_000)))
        with (
            tcp_client(keys, tcp_endpoint, keys.client_secret, 5) as tcp,
            ControlClient([ipc_endpoint], 5) as ipc,
        ):
            assert tcp.call("ping").replies and ipc.call("ping").replies


def flood(peer: zmq.Socket[bytes], frames: list[list[bytes]], count: int) -> list[Any]:
    """Send `count` requests, the `frames` in turn, 200 at a time (a ROUTER drops the replies
    that a slow reader lets pile up); the answers."""
    answers: list[Any] = []
    for batch in range(0, count, 200):
        for i in range(batch, min(batch + 200, count)):
            peer.send_multipart(frames[i % len(frames)])
        while len(answers) < min(batch + 200, count):
            assert peer.poll(5000), "the server stopped answering"
            answers.append(json.loads(peer.recv()))
    return answers


def test_a_flood_of_bad_requests_gets_every_error_reply_and_a_few_log_lines(
    ipc_server: ControlServer, peer: zmq.Socket[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Each bad request was a warning line: a peer could write the arbiter's log as fast as it
    sent. Every one is still answered; the log has one line of it a second."""
    caplog.set_level(logging.DEBUG, logger="supervisor.control")
    bad = [[b"{not json"], [b'{"v": 2, "id": "a", "cmd": "ping"}'], [b"{}", b"{}"]]
    started = time.monotonic()
    with serving(ipc_server) as received:
        answers = flood(peer, bad, 3000)
    elapsed = time.monotonic() - started
    assert len(answers) == 3000 and all("error" in answer for answer in answers)
    assert received == []
    lines = [r for r in caplog.records if "control request refused" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed / BAD_REQUEST_LOG_INTERVAL + 2, (len(lines), elapsed)


def test_a_bug_in_reading_a_request_is_an_error_reply_and_its_traceback_is_throttled_too(
    ipc_server: ControlServer,
    peer: zmq.Socket[bytes],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a peer sends wrong is refused by name; an exception other than that is a bug of
    ours. Its traceback goes to the log, not one per request."""

    def buggy(*args: object) -> Request:
        raise KeyError("a\nb")

    monkeypatch.setattr(control_module, "_parse_request", buggy)
    caplog.set_level(logging.DEBUG, logger="supervisor.control")
    started = time.monotonic()
    with serving(ipc_server):
        answers = flood(peer, [[b'{"v": 1, "id": "a", "cmd": "ping"}']], 1000)
    elapsed = time.monotonic() - started
    assert {answer["error"] for answer in answers} == {"bad request: KeyError: 'a\\nb'"}
    lines = [r for r in caplog.records if "not understood" in r.getMessage()]
    assert 1 <= len(lines) <= elapsed / BAD_REQUEST_LOG_INTERVAL + 2, (len(lines), elapsed)
    assert lines[0].levelno == logging.ERROR and lines[0].exc_info is not None


class Clock:
    """A clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle_on(caplog: pytest.LogCaptureFixture) -> tuple[LogThrottle, Clock]:
    """A LogThrottle of 1 s on a Clock, logging to "tests.throttle" (captured)."""
    caplog.set_level(logging.INFO, logger="tests.throttle")
    clock = Clock()
    return LogThrottle(logging.getLogger("tests.throttle"), 1.0, clock), clock


def throttle_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tests.throttle"]


def test_log_throttle_logs_the_first_line_then_the_last_of_each_interval_with_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle, clock = throttle_on(caplog)
    for peer in range(1000):
        throttle.log(logging.WARNING, "refused peer=%s", peer)
    clock.now += 0.5
    throttle.log(logging.WARNING, "refused peer=%s", "last")
    assert throttle_lines(caplog) == ["refused peer=0"]
    clock.now += 0.5
    throttle.flush()
    summary = "refused peer=last (the last of 1000 such lines in 1 s; the others were not logged)"
    assert throttle_lines(caplog) == ["refused peer=0", summary]
    throttle.log(logging.WARNING, "refused peer=%s", "again")  # the summary's interval
    clock.now += 1
    throttle.flush()
    assert throttle_lines(caplog)[2:] == ["refused peer=again"]  # one alone: as it came
    clock.now += 1
    throttle.flush()  # a quiet interval: the next line is a first one again
    throttle.log(logging.WARNING, "refused peer=%s", "later")
    assert throttle_lines(caplog)[3:] == ["refused peer=later"]


def test_log_throttle_holds_each_kind_of_line_apart_and_keeps_the_first_ones_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttle, clock = throttle_on(caplog)
    for _ in range(3):
        try:
            raise RuntimeError("bug")
        except RuntimeError:
            throttle.log(logging.ERROR, "not understood: %s", "bug", exc_info=True)
        throttle.log(logging.WARNING, "refused: %s", "bad")
    clock.now += 1
    throttle.log(logging.WARNING, "dropped: %s", "full")  # says the counts that are due
    records = [r for r in caplog.records if r.name == "tests.throttle"]
    assert [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in records] == [
        ("ERROR", "not understood: bug", True),
        ("WARNING", "refused: bad", False),
        ("ERROR", "not understood: bug (the last of 2 such lines in 1 s; the others were"
         " not logged)", False),
        ("WARNING", "refused: bad (the last of 2 such lines in 1 s; the others were not"
         " logged)", False),
        ("WARNING", "dropped: full", False),
    ]  # fmt: skip


def test_reply_that_json_cannot_hold_becomes_an_error_reply(
    ipc_server: ControlServer, ipc_endpoint: str
) -> None:
    def bad(server: ControlServer, req: Request) -> None:
        server.reply(req, {"images@h1": {1, 2}})

    with serving(ipc_server, bad), ControlClient([ipc_endpoint], 5) as client:
        result = client.call("ping")
    assert result.replies == {} and result.missing == []
    assert "could not be encoded" in result.errors[ipc_endpoint]


def test_error_reply_is_reported_under_its_endpoint(
    ipc_server: ControlServer, ipc_endpoint: str
) -> None:
    with serving(ipc_server), ControlClient([ipc_endpoint], 5) as client:
        result = client.call("boom")
    assert result.errors == {ipc_endpoint: "boom failed"}
    assert result.missing == []


def test_client_returns_as_soon_as_every_endpoint_answered(
    ctx: zmq.Context[Any], short_dir: Path
) -> None:
    endpoints = [f"ipc://{short_dir}/a/control.sock", f"ipc://{short_dir}/b/control.sock"]
    with contextlib.ExitStack() as stack:
        for endpoint in endpoints:
            stack.enter_context(
                serving(stack.enter_context(ControlServer(ctx, [endpoint], "", "", "h1")))
            )
        client = stack.enter_context(ControlClient(endpoints, 10))
        result = client.call("ping")
    assert result.missing == [] and result.replies
    assert result.elapsed < 1


def test_silent_host_is_reported_missing_after_the_timeout(
    ctx: zmq.Context[Any], ipc_server: ControlServer, ipc_endpoint: str, short_dir: Path
) -> None:
    silent = ctx.socket(zmq.ROUTER)
    silent.linger = 0
    silent.bind(f"ipc://{short_dir}/silent.sock")
    endpoints = [ipc_endpoint, f"ipc://{short_dir}/silent.sock"]
    hosts = {endpoints[1]: "h3"}
    with serving(ipc_server), ControlClient(endpoints, 0.3, hosts=hosts) as client:
        result = client.call("ping")
        assert silent.poll(0), "the silent host was asked"
    assert result.replies == {"images@h1": {"ok": {"cmd": "ping", "args": {}}}}
    assert result.missing == ["h3"]
    assert 0.3 <= result.elapsed < 2
    silent.close()


def test_unknown_host_is_named_by_its_endpoint(short_dir: Path) -> None:
    endpoint = f"ipc://{short_dir}/nobody.sock"
    with ControlClient([endpoint], 0.1) as client:
        assert client.call("ping").missing == [endpoint]


def test_late_reply_to_an_earlier_call_is_ignored(
    ipc_server: ControlServer, ipc_endpoint: str
) -> None:
    with ControlClient([ipc_endpoint], 1) as client:
        assert client.call("first").missing == [ipc_endpoint]
        with serving(ipc_server) as received:
            result = client.call("second")
    assert [req.cmd for req in received] == ["first", "second"]
    assert result.replies == {"images@h1": {"ok": {"cmd": "second", "args": {}}}}


def test_tcp_endpoint_without_client_keys_is_a_config_error(tcp_endpoint: str) -> None:
    with pytest.raises(ControlConfigError, match=tcp_endpoint):
        ControlClient([tcp_endpoint], 1)


def test_result_json_is_replies_missing_elapsed_and_errors_only_if_any() -> None:
    result = Result(replies={"a@h1": {"ok": "pong"}}, missing=["h3"], elapsed=0.0041)
    assert json.loads(result.to_json()) == {
        "replies": {"a@h1": {"ok": "pong"}},
        "missing": ["h3"],
        "elapsed": 0.004,
    }
    result.errors["ipc:///x"] = "bad"
    assert json.loads(result.to_json())["errors"] == {"ipc:///x": "bad"}


def test_events_reach_a_subscriber(ipc_server: ControlServer, ipc_endpoint: str) -> None:
    stop = threading.Event()

    def publish_until_seen() -> None:
        while not stop.wait(0.01):
            ipc_server.publish({"event": "task-succeeded", "task": "t1"})

    publisher = threading.Thread(target=publish_until_seen)
    with ControlClient([ipc_endpoint], 1) as client:
        events = client.subscribe_events()
        publisher.start()
        try:
            assert next(events) == {"event": "task-succeeded", "task": "t1"}
        finally:
            stop.set()
            publisher.join()
            events.close()


def test_keygen_writes_a_private_secret_file_that_loads(tmp_path: Path) -> None:
    public_path, secret_path = keygen(tmp_path / "keys")
    assert Path(public_path).name == "fleet.key"
    assert Path(secret_path).name == "fleet.key_secret"
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    public, secret = load_keypair(secret_path)
    assert load_public(public_path) == public
    assert zmq.curve_public(secret) == public
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "keys")
