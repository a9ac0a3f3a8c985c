"""The arbiter's Prometheus metrics and health: a small registry, worker events into it, and
GET (or HEAD) /metrics, /healthz, /readyz."""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a server starts: most fleets serve no metrics
    from http.server import ThreadingHTTPServer

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RUNTIME_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)  # then +Inf
LATE_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0)  # a tick's enqueue after its time
# Task names are a producer's to choose (a task nobody registered still ends, as FAILURE
# NotRegistered): past this many, a name is counted as OTHER_NAMES, so that no stream of
# made-up names grows the arbiter's memory and the scrape without bound.
MAX_TASK_NAMES = 1000
# And a name may be as long as a message (16 MiB): one longer than this is counted as
# OTHER_NAMES too, whole (a cut name would pass for a real one), and never kept.
MAX_TASK_NAME_LENGTH = 200
OTHER_NAMES = "(other)"


@dataclass(frozen=True)
class Family:
    """A metric family: its name, type, help text and label names."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


FAMILIES = (
    Family("fleetd_tasks_total", "counter", "Tasks finished, by task name and state.",
           ("name", "state")),
    Family("fleetd_task_runtime_seconds", "histogram", "Task run time in a child, in seconds.",
           ("name",), RUNTIME_BUCKETS),
    Family("fleetd_queue_depth", "gauge", "Tasks waiting in a queue.", ("queue",)),
    Family("fleetd_reserved", "gauge", "Tasks a worker reserved but has not started.", ("node",)),
    Family("fleetd_active", "gauge", "Tasks a worker is running now.", ("node",)),
    Family("fleetd_children", "gauge", "Pool processes of a worker.", ("node",)),
    Family("fleetd_pool_size", "gauge",
           "Children a worker's pool holds, or is on its way to (autoscale moves it).", ("node",)),
    Family("fleetd_pool_min", "gauge",
           "The least children a worker's pool may hold (autoscale's MIN; a fixed pool's size).",
           ("node",)),
    Family("fleetd_pool_max", "gauge",
           "The most children a worker's pool may hold (autoscale's MAX; a fixed pool's size).",
           ("node",)),
    Family("fleetd_worker_restarts_total", "counter", "Times the arbiter restarted a worker.",
           ("node",)),
    Family("fleetd_worker_transitions_total", "counter",
           "Times a worker entered a state (STARTING, RUNNING, BACKOFF, FATAL, ...).",
           ("node", "state")),
    Family("fleetd_child_recycles_total", "counter",
           "Children replaced after max_tasks_per_child or max_memory_per_child.", ("node",)),
    Family("fleetd_time_limit_kills_total", "counter",
           "Children killed for exceeding a task's hard time limit.", ("node",)),
    Family("fleetd_redeliveries_total", "counter",
           "Tasks handed out again after their child or worker died.", ("node",)),
    Family("fleetd_dead_letters_total", "counter", "Tasks moved to the dead-letter list.",
           ("node",)),
    Family("fleetd_schedule_runs_total", "counter",
           "Runs of a [[schedule]] enqueued by this host's scheduler.", ("schedule",)),
    Family("fleetd_schedule_late_seconds", "histogram",
           "How long after its tick a run of a schedule was enqueued.", ("schedule",),
           LATE_BUCKETS),
    Family("fleetd_schedule_skips_total", "counter",
           "Times this host's scheduler skipped a schedule's ticks (missed, or paused).",
           ("schedule",)),
)  # fmt: skip

TASK_STATES = {
    "task-succeeded": "SUCCESS",
    "task-failed": "FAILURE",
    "task-revoked": "REVOKED",
    "task-retried": "RETRY",
}
NODE_COUNTERS = {
    "worker-restarted": "fleetd_worker_restarts_total",
    "child-recycled": "fleetd_child_recycles_total",
    "time-limit-kill": "fleetd_time_limit_kills_total",
    "redelivered": "fleetd_redeliveries_total",
    "dead-lettered": "fleetd_dead_letters_total",
}
WORKER_GAUGES = {
    "reserved": "fleetd_reserved",
    "active": "fleetd_active",
    "children": "fleetd_children",
    "pool_size": "fleetd_pool_size",
    "pool_min": "fleetd_pool_min",
    "pool_max": "fleetd_pool_max",
}

LabelValues = tuple[str, ...]


@dataclass
class _Histogram:
    counts: list[int]  # per bucket, not cumulative; the last one is +Inf
    sum: float = 0.0


class Metrics:
    """Counters, gauges and histograms by label values; safe to use from several threads."""

    def __init__(self, families: tuple[Family, ...] = FAMILIES) -> None:
        self._families = {f.name: f for f in families}
        self._samples: dict[str, dict[LabelValues, float]] = {f.name: {} for f in families}
        self._histograms: dict[str, dict[LabelValues, _Histogram]] = {f.name: {} for f in families}
        self._lock = threading.Lock()
        self._names: set[str] = set()  # task names with series of their own (MAX_TASK_NAMES)
        self._others_said = False  # a name was counted as OTHER_NAMES (and that logged)

    def inc(self, name: str, labels: Mapping[str, str], value: float = 1) -> None:
        family = self._family(name, "counter", "gauge")
        if family.kind == "counter" and value < 0:
            raise ValueError(f"counter {name} cannot decrease (inc by {value})")
        key = self._key(family, labels)
        with self._lock:
            samples = self._samples[name]
            samples[key] = samples.get(key, 0.0) + value

    def set(self, name: str, labels: Mapping[str, str], value: float) -> None:
        key = self._key(self._family(name, "gauge"), labels)
        with self._lock:
            self._samples[name][key] = float(value)

    def observe(self, name: str, labels: Mapping[str, str], seconds: float) -> None:
        family = self._family(name, "histogram")
        key = self._key(family, labels)
        with self._lock:
            hist = self._histograms[name].setdefault(
                key, _Histogram([0] * (len(family.buckets) + 1))
            )
            hist.counts[bisect.bisect_left(family.buckets, seconds)] += 1
            hist.sum += seconds

    def declare_node(self, node: str) -> None:
        """Give a node every per-node series at 0 from its start: an alert on a counter or
        gauge sees 0, not "absent", before the first event."""
        with self._lock:
            for name in (*NODE_COUNTERS.values(), *WORKER_GAUGES.values()):
                self._samples[name].setdefault((node,), 0.0)

    def declare_queue(self, queue: str) -> None:
        """A configured queue has its depth series from the start (0 until a worker reports)."""
        with self._lock:
            self._samples["fleetd_queue_depth"].setdefault((queue,), 0.0)

    def forget_node(self, node: str) -> None:
        """A worker that is gone holds, runs and has nothing: its gauges go to 0 (they stay
        series, without holes); its counters stay as they are."""
        with self._lock:
            for name in WORKER_GAUGES.values():
                self._samples[name][(node,)] = 0.0

    def _task_name(self, name: str) -> str:
        """`name`, or OTHER_NAMES for one over MAX_TASK_NAME_LENGTH characters or once
        MAX_TASK_NAMES others have series (said once)."""
        fits = len(name) <= MAX_TASK_NAME_LENGTH
        if fits and (name in self._names or len(self._names) < MAX_TASK_NAMES):
            self._names.add(name)
            return name
        if not self._others_said:
            self._others_said = True
            log.warning(
                "metrics: task names past the first %d, or over %d characters long, are"
                " counted as name=%r",
                MAX_TASK_NAMES,
                MAX_TASK_NAME_LENGTH,
                OTHER_NAMES,
            )
        return OTHER_NAMES

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Count a worker event; return False (and log why) for one it does not know."""
        try:
            kind = event["type"]
            if kind in TASK_STATES:
                task = {"name": self._task_name(str(event["name"]))}
                runtime = event.get("runtime")
                runtime = None if runtime is None else float(runtime)
                self.inc("fleetd_tasks_total", {**task, "state": TASK_STATES[kind]})
                if runtime is not None:
                    self.observe("fleetd_task_runtime_seconds", task, runtime)
            elif kind in NODE_COUNTERS:
                count = int(event.get("count", 1))  # several at once: a dead worker's tasks
                self.inc(NODE_COUNTERS[kind], {"node": event["node"]}, count)
            elif kind == "schedule-fired":
                schedule = {"schedule": str(event["schedule"])}
                self.inc("fleetd_schedule_runs_total", schedule)
                self.observe("fleetd_schedule_late_seconds", schedule, float(event["late"]))
            elif kind == "schedule-skipped":
                self.inc("fleetd_schedule_skips_total", {"schedule": str(event["schedule"])})
            elif kind == "worker-stats":
                node = {"node": event["node"]}
                values = {name: float(event[field]) for field, name in WORKER_GAUGES.items()}
                for name, value in values.items():
                    self.set(name, node, value)
            else:
                log.debug("metrics: ignoring event type %r", kind)
                return False
        except (KeyError, TypeError, ValueError) as exc:
            log.debug("metrics: bad event %r: %r", event, exc)
            return False
        return True

    def render(self) -> str:
        """All families in the Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        with self._lock:
            for family in self._families.values():
                lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
                lines.append(f"# TYPE {family.name} {family.kind}")
                for key, value in sorted(self._samples[family.name].items()):
                    lines.append(_sample(family.name, family.labels, key, value))
                for key, hist in sorted(self._histograms[family.name].items()):
                    lines.extend(_histogram_samples(family, key, hist))
        return "\n".join(lines) + "\n"

    def _family(self, name: str, *kinds: str) -> Family:
        family = self._families.get(name)
        if family is None or family.kind not in kinds:
            raise ValueError(f"no {' or '.join(kinds)} metric named {name}")
        return family

    def _key(self, family: Family, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(family.labels):
            raise ValueError(f"{family.name} takes labels {family.labels}, not {tuple(labels)}")
        return tuple(str(labels[label]) for label in family.labels)


def _histogram_samples(family: Family, key: LabelValues, hist: _Histogram) -> list[str]:
    lines = []
    cumulative = 0
    for bound, count in zip((*family.buckets, math.inf), hist.counts, strict=True):
        cumulative += count
        labels = (*family.labels, "le")
        lines.append(_sample(f"{family.name}_bucket", labels, (*key, _number(bound)), cumulative))
    lines.append(_sample(f"{family.name}_sum", family.labels, key, hist.sum))
    lines.append(_sample(f"{family.name}_count", family.labels, key, cumulative))
    return lines


def _sample(name: str, labels: tuple[str, ...], values: LabelValues, value: float) -> str:
    pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in zip(labels, values, strict=True))
    return f"{name}{{{pairs}}} {_number(value)}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "NaN" if math.isnan(value) else repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass(frozen=True)
class Probe:
    """An answer of /healthz or /readyz: the arbiter's loop replaces it whole, the server's
    thread reads it (one reference: no lock needed)."""

    ok: bool
    reason: str


# Seconds a metrics client may wait between two reads or writes of its connection. Each
# connection holds a thread of the arbiter's: one that sent nothing (a hung scraper, a
# slowloris) held it for good, and a thousand of them a thousand threads.
CLIENT_TIMEOUT = 5.0
# Scrapers at once (one thread and one file descriptor of the arbiter's each). When all are
# taken, a newcomer takes the place of the client that has waited longest for its request
# head; it is refused only when every place serves a request that came whole.
MAX_CLIENTS = 16
# Seconds a client may take to send its request head (request line and headers), which a
# scraper or a load balancer's health check sends at once: a stalled one holds a place no
# longer. And seconds a request may take whole, however it trickles in or out.
HEAD_DEADLINE = 2.0
REQUEST_DEADLINE = 10.0


class MetricsServer:
    """Serves `metrics.render()` at GET /metrics, and the arbiter's last verdicts at /healthz
    and /readyz (200, or 503 with the reason in one line), from a daemon thread."""

    health = Probe(False, "starting")
    readiness = Probe(False, "starting")

    def __init__(self, bind: str, metrics: Metrics) -> None:
        host, _, port = bind.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"metrics bind {bind!r} is not host:port")
        self.address = (host.strip("[]") or "0.0.0.0", int(port))
        self.metrics = metrics
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0), once started."""
        if self._server is None:
            raise RuntimeError("metrics server not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._server = _http_server(self.address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        log.info("serving metrics on http://%s:%d/metrics", self.address[0], self.port)

    def close(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None


def _cut(request: socket.socket) -> None:
    """End a request past its deadline: its reads and writes fail, and its thread ends."""
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


class _Clients:
    """The connections served, at most MAX_CLIENTS, so that no stalled client (one that sends
    nothing, or its head a byte at a time) keeps a health check out: each in the order it
    came, with whether its request head is in."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._head_in: dict[socket.socket, bool] = {}

    def admit(self, request: socket.socket) -> bool:
        """Give `request` a place: when none is free, the place of the one that has waited
        longest for its head, cut. False when every place serves a request that came whole."""
        with self._lock:
            if len(self._head_in) >= MAX_CLIENTS:
                stalled = next((sock for sock, head in self._head_in.items() if not head), None)
                if stalled is None:
                    return False
                self._drop(stalled)
            self._head_in[request] = False
            return True

    def head_in(self, request: socket.socket) -> None:
        with self._lock:
            if request in self._head_in:
                self._head_in[request] = True

    def leave(self, request: socket.socket) -> None:
        with self._lock:
            self._head_in.pop(request, None)

    def watch(self, request: socket.socket, done: threading.Event) -> None:
        """Cut `request` if its head is not in by HEAD_DEADLINE, or it is not `done` by
        REQUEST_DEADLINE."""
        if done.wait(HEAD_DEADLINE):
            return
        with self._lock:
            if self._head_in.get(request) is False:
                self._drop(request)
                return
        if not done.wait(REQUEST_DEADLINE - HEAD_DEADLINE):
            _cut(request)

    def _drop(self, request: socket.socket) -> None:
        del self._head_in[request]  # its place is free now: its thread ends without one
        _cut(request)


def _http_server(address: tuple[str, int], served: MetricsServer) -> ThreadingHTTPServer:
    """A bound HTTP server answering GET and HEAD /metrics, /healthz and /readyz."""
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    # Clients that connect and never send, or send a byte at a time, held a thread and a
    # descriptor each until the arbiter's ran out (libzmq then aborts the process).
    clients = _Clients()

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        request_queue_size = 64  # socketserver's 5 drops connections that come together

        def process_request(self, request: Any, client_address: Any) -> None:
            if not clients.admit(request):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                clients.leave(request)
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            done = threading.Event()
            watcher = threading.Thread(target=clients.watch, args=(request, done), daemon=True)
            try:
                watcher.start()
            except RuntimeError:  # no thread to be had (a limit of tasks): none, then
                self.shutdown_request(request)
                clients.leave(request)
                return
            try:
                super().process_request_thread(request, client_address)
            finally:
                done.set()
                clients.leave(request)

        def handle_error(self, request: Any, client_address: Any) -> None:
            # socketserver prints a traceback on stderr, past fleetd's log format. A client
            # that hung up (or stopped reading) before its answer was written is no error.
            error = sys.exc_info()[1]
            if isinstance(error, OSError):
                log.debug("metrics client %s gone before its answer: %r", client_address[0], error)
            else:
                log.exception("metrics request from %s failed", client_address[0])

        def server_bind(self) -> None:
            # HTTPServer.server_bind resolves the host's FQDN, which can hang on a broken DNS.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    class MetricsHandler(BaseHTTPRequestHandler):
        timeout = CLIENT_TIMEOUT  # a client that sends (or reads) nothing is let go

        def do_GET(self) -> None:
            clients.head_in(self.request)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self.answer(200, CONTENT_TYPE, served.metrics.render())
            elif path in ("/healthz", "/readyz"):
                probe = served.health if path == "/healthz" else served.readiness
                text = f"{'ok' if probe.ok else 'not ok'}: {probe.reason}\n"
                self.answer(200 if probe.ok else 503, "text/plain; charset=utf-8", text)
            else:
                self.send_error(404, "served here: /metrics, /healthz, /readyz")

        # A load balancer's health check: the same status and headers, no body.
        do_HEAD = do_GET

        def answer(self, status: int, content_type: str, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("metrics request from %s: " + format, self.client_address[0], *args)

    return Server(address, MetricsHandler)
