"""Prometheus metrics: worker events in, text exposition format out, over real HTTP."""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import select
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from supervisor import metrics as metrics_module
from supervisor.metrics import (
    FAMILIES,
    HEAD_DEADLINE,
    MAX_CLIENTS,
    MAX_TASK_NAME_LENGTH,
    MAX_TASK_NAMES,
    REQUEST_DEADLINE,
    Metrics,
    MetricsServer,
    Probe,
)
from tests.fleet import Fleet, free_port, wait_for

SAMPLE = re.compile(r'[a-z_]+\{([a-z_]+="([^"\\]|\\.)*",?)+\} (-?[0-9.e+-]+|\+Inf|-Inf|NaN)')


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, checking that every line is HELP, TYPE or a valid sample."""
    result = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            continue
        assert SAMPLE.fullmatch(line), line
        key, value = line.rsplit(" ", 1)
        result[key] = float(value)
    return result


def test_every_family_has_help_and_type_even_before_any_sample() -> None:
    assert Metrics().render().splitlines() == [
        line
        for f in FAMILIES
        for line in (f"# HELP {f.name} {f.help}", f"# TYPE {f.name} {f.kind}")
    ]
    assert all(f.help for f in FAMILIES)


def test_task_events_count_by_name_and_state_and_time_the_run() -> None:
    metrics = Metrics()
    runs = [
        ("task-succeeded", 0.003),
        ("task-succeeded", 0.5),
        ("task-failed", 100.0),
        ("task-revoked", None),
        ("task-retried", 0.1),
    ]
    for kind, runtime in runs:
        event = {"type": kind, "name": "tasks.resize", "node": "images@h1", "runtime": runtime}
        assert metrics.apply(event)
    got = samples(metrics.render())
    total = 'fleetd_tasks_total{name="tasks.resize",state="%s"}'
    assert got[total % "SUCCESS"] == 2
    assert got[total % "FAILURE"] == 1
    assert got[total % "REVOKED"] == 1
    assert got[total % "RETRY"] == 1
    bucket = 'fleetd_task_runtime_seconds_bucket{name="tasks.resize",le="%s"}'
    expected = {"0.001": 0, "0.005": 1, "0.05": 1, "0.1": 2, "0.5": 3, "60.0": 3, "+Inf": 4}
    assert {le: got[bucket % le] for le in expected} == expected
    assert got['fleetd_task_runtime_seconds_count{name="tasks.resize"}'] == 4
    assert got['fleetd_task_runtime_seconds_sum{name="tasks.resize"}'] == pytest.approx(100.603)


def test_task_names_past_the_cap_are_counted_together() -> None:
    """A producer's made-up names (each ends NotRegistered) must not grow the arbiter's
    series without bound: past MAX_TASK_NAMES they share name="(other)"."""
    metrics = Metrics()
    extra = 250
    for i in range(MAX_TASK_NAMES + extra):
        event = {"type": "task-failed", "name": f"made.up{i}", "node": "w@h1", "runtime": 0.01}
        assert metrics.apply(event)
    assert metrics.apply({"type": "task-succeeded", "name": "made.up0", "node": "w@h1"})
    got = samples(metrics.render())
    totals = {k: v for k, v in got.items() if k.startswith("fleetd_tasks_total{")}
    assert len(totals) == MAX_TASK_NAMES + 2  # each name's FAILURE, (other)'s, made.up0's SUCCESS
    assert totals['fleetd_tasks_total{name="(other)",state="FAILURE"}'] == extra
    assert totals['fleetd_tasks_total{name="made.up0",state="SUCCESS"}'] == 1
    assert got['fleetd_task_runtime_seconds_count{name="(other)"}'] == extra


def test_task_names_past_the_length_cap_are_counted_together_and_not_kept() -> None:
    """A name may be as long as a message (16 MiB), and each was kept as a label: 40 names of
    1 MiB doubled the arbiter's memory and made a 10 MiB scrape. Past MAX_TASK_NAME_LENGTH
    characters a name is counted as name="(other)", and takes none of the MAX_TASK_NAMES."""
    metrics = Metrics()
    longest = "t" * MAX_TASK_NAME_LENGTH
    for name in (longest, longest + "x", "n" * 2**20, "m" * 2**20):
        event = {"type": "task-failed", "name": name, "node": "w@h1", "runtime": 0.01}
        assert metrics.apply(event)
    for i in range(MAX_TASK_NAMES - 1):
        assert metrics.apply({"type": "task-failed", "name": f"made.up{i}", "node": "w@h1"})
    text = metrics.render()
    assert len(text) < 200 * MAX_TASK_NAMES
    got = samples(text)
    assert got[f'fleetd_tasks_total{{name="{longest}",state="FAILURE"}}'] == 1
    assert got[f'fleetd_tasks_total{{name="made.up{MAX_TASK_NAMES - 2}",state="FAILURE"}}'] == 1
    assert got['fleetd_tasks_total{name="(other)",state="FAILURE"}'] == 3
    assert got['fleetd_task_runtime_seconds_count{name="(other)"}'] == 3


def test_histogram_lists_every_bucket_in_order() -> None:
    metrics = Metrics()
    metrics.observe("fleetd_task_runtime_seconds", {"name": "t"}, 2)
    les = re.findall(r'le="([^"]+)"', metrics.render())
    assert " ".join(les) == "0.001 0.005 0.01 0.05 0.1 0.5 1.0 5.0 10.0 60.0 +Inf"


@pytest.mark.parametrize(
    ("kind", "family"),
    [
        ("worker-restarted", "fleetd_worker_restarts_total"),
        ("child-recycled", "fleetd_child_recycles_total"),
        ("time-limit-kill", "fleetd_time_limit_kills_total"),
        ("redelivered", "fleetd_redeliveries_total"),
        ("dead-lettered", "fleetd_dead_letters_total"),
    ],
)
def test_node_events_count_per_node(kind: str, family: str) -> None:
    metrics = Metrics()
    for node in ("images@h1", "images@h1", "email@h1"):
        assert metrics.apply({"type": kind, "node": node})
    got = samples(metrics.render())
    assert got[f'{family}{{node="images@h1"}}'] == 2
    assert got[f'{family}{{node="email@h1"}}'] == 1


def test_worker_stats_set_gauges_that_forget_node_zeroes() -> None:
    metrics = Metrics()
    stats = {
        "type": "worker-stats",
        "node": "images@h1",
        "children": 4,
        **{"pool_size": 4, "pool_min": 2, "pool_max": 8},
    }
    assert metrics.apply({**stats, "reserved": 3, "active": 2})
    assert metrics.apply({**stats, "reserved": 1, "active": 0})
    metrics.apply({"type": "worker-restarted", "node": "images@h1"})
    got = samples(metrics.render())
    assert got['fleetd_reserved{node="images@h1"}'] == 1
    assert got['fleetd_active{node="images@h1"}'] == 0
    assert got['fleetd_children{node="images@h1"}'] == 4
    pool = [got[f'fleetd_pool_{g}{{node="images@h1"}}'] for g in ("size", "min", "max")]
    assert pool == [4, 2, 8]
    metrics.forget_node("images@h1")
    got = samples(metrics.render())
    assert got['fleetd_worker_restarts_total{node="images@h1"}'] == 1
    assert [got[f'fleetd_{g}{{node="images@h1"}}'] for g in ("reserved", "active", "children")] == [
        0,
        0,
        0,
    ]


def test_declared_nodes_and_queues_have_every_series_at_zero_from_the_start() -> None:
    metrics = Metrics()
    metrics.declare_node("images@h1")
    metrics.declare_queue("images")
    got = samples(metrics.render())
    for family in (
        "fleetd_worker_restarts_total",
        "fleetd_child_recycles_total",
        "fleetd_time_limit_kills_total",
        "fleetd_redeliveries_total",
        "fleetd_dead_letters_total",
        "fleetd_reserved",
        "fleetd_active",
        "fleetd_children",
        "fleetd_pool_size",
        "fleetd_pool_min",
        "fleetd_pool_max",
    ):
        assert got[f'{family}{{node="images@h1"}}'] == 0
    assert got['fleetd_queue_depth{queue="images"}'] == 0
    metrics.apply({"type": "redelivered", "node": "images@h1", "count": 3})
    metrics.declare_node("images@h1")  # a restart declares again: nothing resets
    assert samples(metrics.render())['fleetd_redeliveries_total{node="images@h1"}'] == 3


@pytest.mark.parametrize(
    "event",
    [
        {"type": "party"},
        {"node": "images@h1"},
        {"type": "task-succeeded", "node": "images@h1"},
        {"type": "worker-stats", "node": "images@h1", "reserved": "many", "active": 1},
        {"type": "task-failed", "name": "t", "runtime": "slow"},
    ],
)
def test_unknown_or_malformed_events_are_refused_without_raising(event: dict[str, object]) -> None:
    assert not Metrics().apply(event)


def test_queue_depth_gauge_and_label_escaping() -> None:
    metrics = Metrics()
    metrics.set("fleetd_queue_depth", {"queue": 'odd "q"\\\n'}, 7)
    assert samples(metrics.render()) == {'fleetd_queue_depth{queue="odd \\"q\\"\\\\\\n"}': 7}


def test_misuse_is_refused() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="cannot decrease"):
        metrics.inc("fleetd_tasks_total", {"name": "t", "state": "SUCCESS"}, -1)
    with pytest.raises(ValueError, match="takes labels"):
        metrics.inc("fleetd_tasks_total", {"name": "t"})
    with pytest.raises(ValueError, match="no gauge metric named fleetd_tasks_total"):
        metrics.set("fleetd_tasks_total", {"name": "t", "state": "SUCCESS"}, 1)
    with pytest.raises(ValueError, match="no histogram metric"):
        metrics.observe("fleetd_nothing", {}, 1)


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    metrics = Metrics()
    metrics.apply({"type": "dead-lettered", "node": "images@h1"})
    server = MetricsServer("127.0.0.1:0", metrics)
    server.start()
    try:
        yield server
    finally:
        server.close()


def test_server_serves_metrics_over_http(server: MetricsServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        body = reply.read().decode()
    assert body == server.metrics.render()
    assert samples(body) == {'fleetd_dead_letters_total{node="images@h1"}': 1}


def test_server_answers_404_elsewhere(server: MetricsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10)
    assert error.value.code == 404


def exchange(port: int, request: bytes) -> tuple[bytes, set[bytes], bytes]:
    """A raw HTTP exchange: the status line, the headers but Date, and what came after."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes after its answer (HTTP/1.0)
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    return status, {h for h in headers if not h.startswith(b"Date:")}, body


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/elsewhere"])
def test_head_answers_as_get_does_without_the_body(server: MetricsServer, path: str) -> None:
    """Load balancers check health with HEAD: it answered 501."""
    server.health = Probe(True, "every worker is running")  # readiness: 503, "starting"
    get = exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = exchange(server.port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert head == (get[0], get[1], b"") and get[2], (get, head)


def test_closed_server_refuses_connections() -> None:
    server = MetricsServer("127.0.0.1:0", Metrics())
    server.start()
    port = server.port
    server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)


def test_a_client_that_sends_nothing_is_let_go_and_the_server_answers_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients that connect and send nothing (a hung scraper, a slowloris) each held one of
    the arbiter's threads for good: each is let go after CLIENT_TIMEOUT (here 0.3 s)."""
    monkeypatch.setattr(metrics_module, "CLIENT_TIMEOUT", 0.3)
    server = MetricsServer("127.0.0.1:0", Metrics())
    server.start()
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        for sock in silent:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            assert reply.status == 200
    finally:
        for sock in silent:
            sock.close()
        server.close()


def big_metrics() -> Metrics:
    """Metrics whose answer is more than the sockets' buffers hold."""
    metrics = Metrics()
    metrics.set("fleetd_queue_depth", {"queue": "q" * 2**24}, 1)
    return metrics


def blocked_reader(port: int, request: bytes) -> socket.socket:
    """A client that sent `request` and read the first byte of a big answer, and no more:
    the server is writing the rest, blocked on full buffers."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(request)
    client.settimeout(10)
    assert client.recv(1) == b"H"
    return client


def test_a_client_gone_before_its_answer_is_one_debug_line_and_the_server_answers_on(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A scraper that hangs up while its answer is written made socketserver print a
    BrokenPipeError or ConnectionResetError traceback on the arbiter's stderr, past fleetd's
    one-line log format. The client is gone, nothing failed: one debug line says so."""
    server = MetricsServer("127.0.0.1:0", big_metrics())
    server.start()
    caplog.set_level(logging.DEBUG, logger="supervisor.metrics")
    try:
        with blocked_reader(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # closed with a reset: the server's next write fails
        stderr = ""
        deadline = time.monotonic() + 5
        while not gone(caplog) and "Exception" not in stderr and time.monotonic() < deadline:
            time.sleep(0.05)
            stderr += capfd.readouterr().err
        assert "Traceback" not in stderr + capfd.readouterr().err
        assert len(gone(caplog)) == 1
        assert not [r for r in caplog.records if r.exc_info or "\n" in r.getMessage()]
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert len(reply.read()) > 2**24
    finally:
        server.close()


def healthz(port: int) -> tuple[int, float]:
    """GET /healthz: its status, and the seconds it took."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            status = reply.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.monotonic() - started


def test_when_silent_clients_hold_every_place_the_one_that_waited_longest_makes_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_CLIENTS clients that connect and send nothing held every place, and a health check
    was closed unanswered until their deadline: the host was pulled from its load balancer.
    (The deadlines are made long here: only making room can answer in time.)"""
    monkeypatch.setattr(metrics_module, "HEAD_DEADLINE", 30.0)
    monkeypatch.setattr(metrics_module, "CLIENT_TIMEOUT", 30.0)
    server = MetricsServer("127.0.0.1:0", Metrics())
    server.start()
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CLIENTS)]
    try:
        status, seconds = healthz(server.port)
        assert status == 503 and seconds < 1  # 503: no arbiter has said the host is well
        silent[0].settimeout(5)
        assert silent[0].recv(1) == b""  # closed by the server
        assert select.select(silent[1:], [], [], 0)[0] == []  # the others are served on
    finally:
        for sock in silent:
            sock.close()
        server.close()


def test_a_client_that_sends_its_request_head_a_byte_at_a_time_is_cut_at_the_head_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "HEAD_DEADLINE", 0.5)
    monkeypatch.setattr(metrics_module, "CLIENT_TIMEOUT", 30.0)  # each byte comes in time
    server = MetricsServer("127.0.0.1:0", Metrics())
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as client:
            client.settimeout(0.05)
            started = time.monotonic()

            def cut() -> bool:
                try:
                    client.send(b"G")
                    return client.recv(1) == b""
                except TimeoutError:
                    return False
                except OSError:  # reset
                    return True

            wait_for(cut, 10, 0, "the server to cut the trickling client")
            assert 0.5 <= time.monotonic() - started < 5
        assert healthz(server.port)[0] == 503  # and the server answers on
    finally:
        server.close()


def test_a_newcomer_is_refused_only_when_every_place_serves_a_request_that_came_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client whose request came whole is being answered: no newcomer cuts it short."""
    monkeypatch.setattr(metrics_module, "MAX_CLIENTS", 1)
    monkeypatch.setattr(metrics_module, "CLIENT_TIMEOUT", 30.0)
    server = MetricsServer("127.0.0.1:0", big_metrics())
    server.start()
    try:
        with blocked_reader(server.port, b"GET /metrics HTTP/1.0\r\n\r\n") as reader:
            with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
                healthz(server.port)
            answer = b"H"
            while chunk := reader.recv(2**20):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200 OK") and len(answer) > 2**24
    finally:
        server.close()


def test_max_clients_silent_or_trickling_connections_keep_no_health_check_of_a_fleet_out(
    make_fleet: Callable[..., Fleet],
) -> None:
    """Against a real fleetd: with every place of its metrics server held by clients that send
    nothing or half a request, /healthz answers at once, well within HEAD_DEADLINE, every
    time they take every place again."""
    port = free_port()
    make_fleet(extra=f'\n[metrics]\nbind = "127.0.0.1:{port}"\n').start()
    wait_for(lambda: healthz(port)[0] == 200, 10, message="/healthz 200")
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            for i in range(MAX_CLIENTS):
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(client)
                if i % 2:
                    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x")  # never ends
            status, seconds = healthz(port)
            assert status == 200 and seconds < HEAD_DEADLINE / 2 < REQUEST_DEADLINE, seconds
    finally:
        for client in held:
            with contextlib.suppress(OSError):
                client.close()


def gone(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The debug lines that say a metrics client hung up before its answer was written."""
    return [r for r in caplog.records if "gone before its answer" in r.getMessage()]


@pytest.mark.parametrize("bind", ["127.0.0.1", "localhost:http", ""])
def test_bind_must_be_host_and_port(bind: str) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        MetricsServer(bind, Metrics())
