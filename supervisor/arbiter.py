"""The arbiter: one per host, starts and supervises the workers, answers for the host.

`Arbiter.run()` is the whole lifecycle, top to bottom. Signal handlers only enqueue;
the loop dispatches `handle_<signame>`, reads the workers' sockets and the control
sockets, reaps every child (its own and re-parented orphans), and restarts workers
that died. It never runs user code and never talks to a broker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from worker.logs import log_env
from worker.protocol import FrameReader, ProtocolError, encode

from . import config as configmod
from . import orphans, states
from .memory import release_free_heap
from .metrics import Metrics, MetricsServer
from .notify import Notifier
from .pidfile import PidfileWriteError, remove_pidfile, write_pidfile
from .report import health, host_status, readiness, status_line
from .signals import HANDLED, SignalQueue, name
from .states import BACKOFF, FATAL, RUNNING, STARTING, STOPPED, STOPPING, State
from .workers import (
    Outbox,
    WorkerProc,
    describe_exit,
    end_spawned,
    exit_reason,
    hung,
    launch,
    may_leave_idle_priority,
    refresh_children,
)

if TYPE_CHECKING:
    import zmq

    from .commands import Router

log = logging.getLogger("fleetd.arbiter")
# zmq.POLLIN and zmq.POLLOUT, which zmq.Poller takes for plain descriptors too (select.POLLOUT
# is another number); zmq itself is imported once the workers are spawned.
POLLIN, POLLOUT = 1, 2

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BOOT_ERROR = 3  # a worker could not boot at `fleetd start`: the fleet was ended (gunicorn's)

TRANSITIONS_METRIC = "fleetd_worker_transitions_total"
COLD_KILL_AFTER = 10.0  # seconds a worker gets to exit on QUIT before SIGKILL
RECORD_EVERY = 0.05  # seconds between writes of the run record (recycling forks one a task)


class Arbiter:
    def __init__(
        self,
        config: configmod.Config,
        log_level: str = "info",
        log_format: str = "text",
        pidfile: str | None = None,
    ) -> None:
        self.config = config
        self.log_level = log_level
        self.log_format = log_format
        self.pidfile = pidfile or os.path.join(config.state_dir, "fleetd.pid")
        self.workers: list[WorkerProc] = []
        self.by_fd: dict[int, WorkerProc] = {}
        self.generation = 0
        self.halting: str | None = None  # None, "warm" or "cold"
        self.failure = ""  # why `fleetd start` failed (a worker could not boot): the exit's reason
        self.reload_failure = ""  # why the last reload's new generation could not start
        self.cold_deadline = 0.0
        self.interrupts = 0
        self.reloading = False
        self.reload_again = False  # a HUP came while a generation booted: one more follows it
        # Workers the last reload's config dropped (a rename, a replacement): they serve on
        # until the whole new generation is up (retire_removed), as a replaced one does.
        self.removed: list[WorkerProc] = []
        self.dead_owners: list[str] = []  # tasks to give back through a live worker
        self.router: Router  # made with the control plane, as the commands it routes
        self.events_on: set[str] = set()  # nodes with events enabled: so are their next processes
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.poller: zmq.Poller | None = None  # made with the control plane, after the spawns
        self.ready_announced = False
        self.next_tick = 0.0
        self.tasks_done = 0  # by workers that are gone; live ones report their own
        self.booted: set[str] = set()  # worker names that have been ready once: /readyz
        self.run_record = orphans.RunRecord(config.state_dir)
        self.run_id = os.urandom(16).hex()  # the mark of every process this run starts
        self.record_due = False  # the run record changed: written at the end of a loop's turn,
        self.record_written_at = -RECORD_EVERY  # the first change after a quiet spell at once
        self.arbiter_record = orphans.process_record(os.getpid())
        self.unwritten_pidfile: orphans.StateFile | None = None  # tried again every second
        self.lock_lost = False  # our lock file was removed and someone else took a new one
        self.may_leave_idle = may_leave_idle_priority()  # else a reload's workers boot at ours

    # --- lifecycle ---------------------------------------------------------------
    def run(self) -> int:
        self.start()
        try:
            while not self.done():
                self.step()
        finally:
            self.stop()
            # The interpreter's exit puts back the default actions: a signal now would end
            # us with its own status (HUP: -1) instead of ours. It waits, blocked.
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        return EXIT_BOOT_ERROR if self.failure else EXIT_OK

    def start(self) -> None:
        self.lock_fd = orphans.lock_state_dir(self.config.state_dir)
        orphans.become_subreaper()
        previous = self.run_record.read()
        # Queued from here: a TERM or INT in the leftovers' grace waits for the loop, which
        # stops the fleet, rather than ending us with the previous run's KILL not yet sent.
        self.signals = SignalQueue()
        orphans.end_leftovers(previous)
        owners = previous.get("owners")  # a torn or foreign record holds anything
        if isinstance(owners, list):
            self.dead_owners += [owner for owner in owners if isinstance(owner, str)]
        self.write_run_record()  # our mark is on disk before any process carries it
        if os.path.dirname(os.path.abspath(self.pidfile)) == os.path.abspath(
            self.config.state_dir
        ):  # we hold the state dir's lock: a pidfile there is a previous run's (its pid
            # perhaps another fleet's arbiter's now, which is no reason to refuse to start)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.pidfile)
        try:
            write_pidfile(self.pidfile)
        except PidfileWriteError:  # a full disk, say: `fleetd stop` needs it, the fleet does not
            self.unwritten_pidfile = orphans.StateFile(self.pidfile)
            self.retry_pidfile()
        # The workers first: they import their task modules on the other cores while the
        # control plane (pyzmq, its sockets and keys) is set up here.
        for spec in self.config.workers:
            self.spawn_worker(spec, self.generation, "fleetd start")
        self.write_run_record()
        try:
            self.open_control_plane()
        except BaseException:
            end_spawned(self.workers, COLD_KILL_AFTER)
            remove_pidfile(self.pidfile)
            raise
        self.watchdog_every = self.notifier.watchdog_interval()
        self.next_watchdog = 0.0
        log.info(
            "fleetd started: %d workers, control on %s",
            len(self.workers),
            ", ".join(self.config.control.bind),
        )

    def open_control_plane(self) -> None:
        import zmq

        from .commands import Router
        from .control import ControlServer

        self.router = Router(self)

        self.ctx = zmq.Context()
        self.control = ControlServer(
            self.ctx,
            self.config.control.bind,
            self.config.control.curve_secret_key,
            self.config.control.authorized_keys,
            self.config.node,
        )
        self.control_sockets = set(self.control.sockets())
        self.poller = zmq.Poller()
        signal_fds = [fd for fd in (self.signals.read_fd, self.signals.quit_fd) if fd >= 0]
        for target in [*signal_fds, *self.control_sockets, *self.by_fd]:
            self.poller.register(target, POLLIN)
        if self.config.metrics_bind:
            self.metrics_server = MetricsServer(self.config.metrics_bind, self.metrics)
            try:
                self.metrics_server.start()
            except OSError as exc:  # in use, a host no name resolves: as a control bind's
                reason = exc.strerror or str(exc)
                raise configmod.ControlConfigError(
                    f"[metrics] bind {self.config.metrics_bind}: cannot listen: {reason}"
                ) from None

    def step(self) -> None:
        timeout = self.poll_timeout()
        assert self.poller is not None  # made by start()
        for target, events in self.poller.poll(math.ceil(timeout * 1000)):
            if target in (self.signals.read_fd, self.signals.quit_fd):
                continue  # drained below
            if target in self.control_sockets:
                self.read_control(target)
            elif target in self.by_fd:
                if events & POLLOUT:
                    self.flush(self.by_fd[target])
                if events & ~POLLOUT and target in self.by_fd:
                    self.read_worker(self.by_fd[target])
        for signum in self.signals.drain():
            handler = getattr(self, f"handle_{name(signum)}", None)
            if handler is None:  # a stray one (signals.HANDLED): logged, nothing else
                log.warning("%s means nothing to fleetd: ignored", signal.Signals(signum).name)
            else:
                handler()
        now = time.monotonic()
        self.router.expire(now)
        self.murder_workers(now)
        self.manage_workers(now)
        self.tick(now)
        if self.record_due and now >= self.record_written_at + RECORD_EVERY:
            self.write_run_record()

    def done(self) -> bool:
        return self.halting is not None and not any(w.pid for w in self.workers)

    def stop(self) -> None:
        orphans.end_strays_and_wait({w.pid for w in self.workers if w.pid})
        self.write_run_record()
        self.router.answer_all()
        self.control.close()
        if self.metrics_server:
            self.metrics_server.close()
        self.ctx.term()
        remove_pidfile(self.pidfile)
        if not self.dead_owners:  # else the next start gives their tasks back, not the lease
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.config.state_dir, "run.json"))
        log.info("fleetd stopped")

    def poll_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [self.next_tick]
        if self.watchdog_every:  # half of WatchdogSec, which may be under the tick's second
            deadlines.append(self.next_watchdog)
        deadlines += self.router.deadlines()
        deadlines += [w.backoff_until for w in self.workers if w.state == BACKOFF]
        if self.halting == "cold":
            deadlines.append(self.cold_deadline)
        if self.record_due:
            deadlines.append(self.record_written_at + RECORD_EVERY)
        return max(0.0, min(min(deadlines) - now, 1.0))

    # --- signals (DESIGN section 2) ----------------------------------------------
    def handle_term(self) -> None:
        self.halt("warm")

    def handle_int(self) -> None:
        self.interrupts += 1
        self.halt("warm" if self.interrupts == 1 else "cold")

    def handle_quit(self) -> None:
        self.halt("cold")

    def handle_hup(self) -> None:
        self.reload()

    def handle_ttin(self) -> None:
        self.broadcast_signal(signal.SIGTTIN)

    def handle_ttou(self) -> None:
        self.broadcast_signal(signal.SIGTTOU)

    def handle_usr1(self) -> None:
        log.info("status: %s", json.dumps(host_status(self)))
        self.broadcast_signal(signal.SIGUSR1)

    def handle_chld(self) -> None:
        self.reap_workers()

    def broadcast_signal(self, signum: int) -> None:
        for w in self.workers:
            if w.pid and w.state in (STARTING, RUNNING):
                self.kill_worker(w, signum)

    # --- workers -----------------------------------------------------------------
    def spawn_worker(
        self,
        spec: configmod.WorkerSpec,
        generation: int,
        reason: str,
        replacing: WorkerProc | None = None,
        polite: bool = False,
    ) -> WorkerProc:
        """Start a worker process (`reason`: what starts it, for the log). `polite`: another
        generation serves its queues meanwhile, so it boots (imports, connects) at idle CPU
        priority (SCHED_IDLE), leaving the CPU to the tasks running, and returns to our
        scheduling policy before it forks its children."""
        w = replacing or WorkerProc(spec, generation)
        w.started_at = w.heard_at = time.monotonic()
        w.ready_at, w.exit_cause = None, ""
        polite = polite and self.may_leave_idle
        if w not in self.workers:
            self.workers.append(w)
            for state in State:  # every series at 0 from the start: an alert sees 0, not absent
                self.metrics.inc(TRANSITIONS_METRIC, {"node": spec.node, "state": state.name}, 0)
        self.change_state(w, STARTING, reason)
        env = {
            **log_env(self.log_level, self.log_format),
            "FLEETD_WORKER_SPEC": json.dumps(spec.to_json()),
            "FLEETD_ARBITER_PID": str(os.getpid()),
            "FLEETD_GENERATION": str(generation),
            "FLEETD_METRICS": "1" if self.config.metrics_bind else "0",
            "FLEETD_EVENTS": "1" if spec.node in self.events_on else "0",
            orphans.RUN_MARK: self.run_id,
        }
        try:  # polite: the policy the worker returns to once booted
            w.pid, ours = launch(spec, env, os.sched_getscheduler(0) if polite else None)
        except OSError as exc:  # EMFILE, EAGAIN, ENOMEM: a failed start, not the arbiter's end
            self.restart_later(w, f"cannot start it: {exc}")
            return w
        w.record = orphans.process_record(w.pid)
        self.metrics.declare_node(spec.node)
        for queue in spec.queues:
            self.metrics.declare_queue(queue)
        w.sock = ours
        w.reader = FrameReader()
        self.by_fd[ours.fileno()] = w
        if self.poller is not None:  # else the control plane's start registers it
            self.poller.register(ours.fileno(), POLLIN)
        self.record_due = True
        log.info("spawned worker %s pid=%d generation=%d", w.node, w.pid, generation)
        return w

    def kill_worker(self, w: WorkerProc, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signum)

    def change_state(self, w: WorkerProc, new: State, reason: str) -> None:
        """The one place a worker's state changes: checked against states.TRANSITIONS, logged
        with the worker's node and the reason, and counted."""
        old = w.state
        if new == old:
            return
        if not states.allowed(old, new):  # a bug in the arbiter; the tests fail on this line
            log.error(
                "illegal state transition %s -> %s: %s",
                old.name,
                new.name,
                reason,
                extra={"node": w.node},
            )
        w.state = new
        self.metrics.inc(TRANSITIONS_METRIC, {"node": w.node, "state": new.name})
        level = {FATAL: logging.ERROR, BACKOFF: logging.WARNING}.get(new, logging.INFO)
        log.log(level, "%s -> %s: %s", old.name, new.name, reason, extra={"node": w.node})

    def stop_worker(self, w: WorkerProc, reason: str = "asked to stop") -> None:
        """Ask a worker to leave (warm, with TERM); it is not restarted."""
        if w.pid:
            self.ask_to_leave(w, signal.SIGTERM, reason)
        elif w.state in (BACKOFF, FATAL):
            self.change_state(w, STOPPED, reason)

    def ask_to_leave(self, w: WorkerProc, signum: int, reason: str) -> None:
        """Relay TERM or QUIT, then CONT, as systemd does: a stopped worker must run to leave."""
        self.change_state(w, STOPPING, f"{reason} ({signal.Signals(signum).name})")
        self.kill_worker(w, signum)
        self.kill_worker(w, signal.SIGCONT)

    def reap_workers(self) -> None:
        reaped = orphans.reap_all()
        for pid, status in reaped:
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                log.debug("reaped orphan pid=%d", pid)
                continue
            self.worker_exited(w, status)
        if reaped:  # a worker that died left its children, and what they started, to us
            orphans.end_strays({w.pid for w in self.workers if w.pid})

    def worker_exited(self, w: WorkerProc, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        self.read_worker(w)  # its last words: final stats, events, a boot error
        self.close_channel(w)
        w.pid = 0
        orphans.kill_groups(list(w.children.values()))  # their tasks' subprocesses die with them
        w.children = {}
        w.ended = set()
        self.dead_owners += w.recovering  # told, but it never said it gave them back
        w.recovering = []
        if w.owner:
            self.dead_owners.append(w.owner)
            w.owner = ""
        if self.dead_owners:
            self.give_back_tasks()
        self.metrics.forget_node(w.node)
        self.tasks_done += int(w.stats.get("succeeded", 0)) + int(w.stats.get("failed", 0))
        w.stats = {}
        self.record_due = True
        if w.state == STOPPING:
            self.change_state(w, STOPPED, f"exited ({describe_exit(code)})")
            self.check_ready()  # a reload whose last booting worker was stopped is over
            return
        why = exit_reason(w, code)
        if w.state == STARTING and not self.ready_announced:
            w.failure = why
            self.change_state(w, FATAL, why)
            self.fail_start(f"{w.node} {why}")
            return
        self.metrics.apply({"type": "worker-restarted", "node": w.node})
        self.restart_later(w, why)

    def fail_start(self, failure: str) -> None:
        """A worker could not boot at `fleetd start`: end the fleet (the others warm) and exit
        EXIT_BOOT_ERROR, so that systemd sees a failed start rather than wait for a READY that
        would never come (gunicorn's WORKER_BOOT_ERROR)."""
        self.failure = failure
        log.error("%s: ending the fleet", failure)
        self.notifier.status(failure)
        self.halt("warm")

    def restart_later(self, w: WorkerProc, why: str) -> None:
        """A worker died or could not start: start it again after a backoff that grows with
        each failed start in a row, or leave it FATAL after states.FATAL_AFTER of them."""
        w.failure = why
        ran = None if w.ready_at is None else time.monotonic() - w.ready_at
        w.fast_deaths = w.fast_deaths + 1 if states.failed_start(ran) else 0
        if states.gives_up(w.fast_deaths):
            self.change_state(
                w, FATAL, f"{why}; {w.fast_deaths} failed starts in a row: left down until started"
            )
            self.check_ready()  # a reload's new generation gave up
            return
        delay = states.restart_delay(w.fast_deaths)
        w.backoff_until = time.monotonic() + delay
        self.change_state(w, BACKOFF, f"{why}; restarting in {delay:.2f}s")

    def murder_workers(self, now: float) -> None:
        """SIGKILL a worker that is hung (workers.hung: silent, or booting, for its
        worker_timeout). Its reap restarts it and gives its tasks back at once (gunicorn's)."""
        for w in self.workers:
            cause = hung(w, now)
            if cause:
                w.exit_cause = cause
                log.error("%s: killing it", cause, extra={"node": w.node})
                self.kill_worker(w, signal.SIGKILL)

    def give_back_tasks(self) -> None:
        """Have a live worker release the tasks of dead consumers at once, not after their lease
        (a worker that does not read is passed over; the tick tries again)."""
        for live in self.workers:
            while (
                live.state == RUNNING
                and self.dead_owners
                and self.send(live, {"type": "recover", "owner": self.dead_owners[-1]})
            ):
                live.recovering.append(self.dead_owners.pop())

    def close_channel(self, w: WorkerProc) -> None:
        if w.sock is not None:
            fd = w.sock.fileno()
            self.by_fd.pop(fd, None)
            if self.poller is not None:
                with contextlib.suppress(KeyError):
                    self.poller.unregister(fd)
            w.sock.close()
            w.sock = None
            w.outbox = Outbox()

    def manage_workers(self, now: float) -> None:
        """Restart workers whose backoff ran out; drop stopped old generations."""
        for w in list(self.workers):
            if w.state == BACKOFF and now >= w.backoff_until and not self.halting:
                self.spawn_worker(w.spec, w.generation, "backoff over", replacing=w)
            elif w.state == STOPPED and w.generation < self.generation:
                self.workers.remove(w)
        if self.halting == "cold" and now >= self.cold_deadline:
            for w in self.workers:
                if w.pid:
                    log.warning("worker %s did not exit on QUIT: killing it", w.node)
                    self.kill_worker(w, signal.SIGKILL)
            self.cold_deadline = now + COLD_KILL_AFTER

    # --- worker channel ------------------------------------------------------------
    def send(self, w: WorkerProc, message: dict[str, Any]) -> bool:
        """Queue a frame for a worker and write what its socket takes now, the rest as it
        reads; False if it is gone or has left OUTBOX_LIMIT bytes unread (hung, stopped)."""
        if w.sock is None or w.outbox.full():
            return False
        w.outbox.push(encode(message))
        return self.flush(w)

    def flush(self, w: WorkerProc) -> bool:
        """Write what a worker's socket takes of its outbox, and poll for room for the rest;
        False if the channel broke (the worker is going: its reap settles the rest)."""
        if w.sock is None:
            return False
        broken = False
        try:
            w.outbox.flush(w.sock)
        except OSError as exc:
            log.warning("channel to %s broke: %s", w.node, exc)
            w.outbox = Outbox()
            broken = True
        if self.poller is not None:
            self.poller.register(w.sock.fileno(), POLLIN | (POLLOUT if w.outbox else 0))
        return not broken

    def read_worker(self, w: WorkerProc) -> None:
        """Take in every message waiting on a worker's channel, and close it at its end (the
        worker exits; the reap settles the rest). The reap calls it too: an exit can be seen
        before the worker's last messages (its final events and stats) were read."""
        while w.sock is not None:
            try:
                data = w.sock.recv(262144, socket.MSG_DONTWAIT)
                w.heard_at = time.monotonic()
                messages = w.reader.feed(data) if data else None
            except BlockingIOError:
                return
            except (OSError, ProtocolError) as exc:
                log.warning("channel to %s broke: %s", w.node, exc)
                messages = None
            if messages is not None and not all(isinstance(m, dict) for m in messages):
                log.warning("channel to %s broke: a frame is not a JSON object", w.node)
                messages = None
            if messages is None:
                self.close_channel(w)
                return
            for message in messages:
                self.on_worker_message(w, message)

    def on_worker_message(self, w: WorkerProc, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ready":
            w.commands = frozenset(message.get("commands", ()))
            self.worker_ready(w, str(message.get("owner", "")))
        elif kind == "child":  # forked just now, before it got any task
            self.child_forked(w, message)
        elif kind == "child-gone":  # its group is ended: no run record needs it any more
            if isinstance(pid := message.get("pid"), int):
                w.children.pop(pid, None)
        elif kind == "boot-error":  # its last words: it exits next
            w.exit_cause = f"could not boot: {str(message.get('error'))[:1000]}"
        elif kind == "recovered":  # it gave a dead consumer's tasks back
            with contextlib.suppress(ValueError):
                w.recovering.remove(str(message.get("owner")))
                self.record_due = True
        elif kind == "reply":
            self.router.on_reply(str(message.get("id")), w.node, message.get("reply"))
        elif kind == "stats":
            w.stats = message
            self.metrics.apply({**message, "type": "worker-stats", "node": w.node})
            for queue, depth in message.get("depths", {}).items():
                self.metrics.set("fleetd_queue_depth", {"queue": queue}, depth)
        elif kind == "events":
            for event in message.get("events", []):
                self.metrics.apply(event)
                if message.get("publish"):
                    self.control.publish(event)

    def child_forked(self, w: WorkerProc, message: dict[str, Any]) -> None:
        """Record a worker's new child at once, in memory and in the run record: if the worker
        dies a moment later, its child's group (with what its task started) dies with it."""
        pid = message.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return
        record = orphans.process_record(pid)
        if record is not None:  # else it is gone already, and with it what it could start
            w.children[pid] = {**record, "group": True}
            self.record_due = True

    def worker_ready(self, w: WorkerProc, owner: str) -> None:
        w.ready_at = time.monotonic()
        if w.state == STARTING:  # else it was asked to leave while it booted
            self.change_state(w, RUNNING, "ready")
        self.booted.add(w.spec.name)
        w.owner = owner
        self.record_due = True
        self.give_back_tasks()
        for old in w.retire_when_ready:
            log.info(
                "reload: %s generation %d is up, stopping generation %d",
                w.node,
                w.generation,
                old.generation,
            )
            self.stop_worker(old, f"reload: generation {w.generation} is up")
        w.retire_when_ready = []
        self.retire_removed()
        self.check_ready()

    def retire_removed(self) -> None:
        """Stop the workers that the last reload dropped from the config, once every worker
        of the new generation is up: until then they consume their queues, which a renamed
        or replacing worker has yet to. A new generation that fails leaves them serving (the
        reload failed); one that comes up later (`fleetctl start`), or the next reload, does."""
        current = [
            w
            for w in self.workers
            if w.generation == self.generation and w.state not in (STOPPED, STOPPING)
        ]
        if self.halting or not self.removed or any(w.state != RUNNING for w in current):
            return
        removed, self.removed = self.removed, []
        for w in removed:
            if w.state not in (STOPPED, STOPPING):  # else an operator or its end was first
                self.stop_worker(
                    w, f"reload: removed from the config, generation {self.generation} is up"
                )

    def check_ready(self) -> None:
        """Tell systemd once every current worker consumes (at start), and once a reload's new
        generation does or gave up: READY either way, since the old generation serves on where
        the new one failed; the log and STATUS= say so."""
        if self.halting or (self.ready_announced and not self.reloading):
            return
        current = [
            w
            for w in self.workers
            if w.generation == self.generation and w.state not in (STOPPED, STOPPING)
        ]
        if not current and not self.reloading:
            return  # at start, before the spawns
        if not all(w.state in (RUNNING, FATAL) for w in current):
            return
        failed = "; ".join(f"{w.node} {w.failure}" for w in current if w.state == FATAL)
        if self.reloading and not current:
            log.info("reload: generation %d was stopped before it was up", self.generation)
        elif self.reloading and failed:
            self.reload_failure = f"reload to generation {self.generation} failed: {failed}"
            log.error("%s; the generation before serves on", self.reload_failure)
        elif self.reloading:
            log.info("reload complete: generation %d", self.generation)
        self.notifier.ready(status_line(self))
        self.ready_announced = True
        self.reloading = False
        release_free_heap()  # what the boot, or the reload, allocated and freed
        if self.reload_again:
            self.reload_again = False
            log.info(
                "reload: starting the reload asked for while generation %d booted", self.generation
            )
            self.reload()

    # --- reload and halt ---------------------------------------------------------------
    def reload(self) -> str | None:
        """Start a new generation of every worker from the re-read config, then stop the old
        one as each new worker is ready: there is never a moment without a consumer.
        One asked for while a generation still boots follows it (the config and code read
        then): a burst of HUPs boots one more generation, not one each, side by side.
        Returns why the reload was refused, if it was."""
        if self.halting:
            return "the host is shutting down"
        try:
            new = configmod.load(self.config.path, node=self.config.node)
        except configmod.ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return f"reload refused, keeping the running config: {exc}"
        refused = configmod.non_reloadable_changes(self.config, new)
        if refused:
            why = f"reload refused: {', '.join(refused)} cannot change without a restart"
            log.error("%s; keeping the running config", why)
            return why
        if self.reloading:
            if not self.reload_again:
                log.info(
                    "reload: generation %d still boots; another reload follows it", self.generation
                )
            self.reload_again = True
            return None
        self.notifier.reloading()
        self.reloading = True
        self.reload_failure = ""
        self.config = new
        self.generation += 1
        old_by_name: dict[str, list[WorkerProc]] = {}
        for w in self.workers:
            if w.state not in (STOPPED, STOPPING):
                old_by_name.setdefault(w.spec.name, []).append(w)
        names = {spec.name for spec in new.workers}
        # Those the new config drops (a previous reload's too, if dropped again) serve on
        # until the new generation is up: stopped now, a renamed worker's queues would have
        # no consumer while its successor boots.
        self.removed = [w for n, ws in old_by_name.items() if n not in names for w in ws]
        served = {queue for w in self.removed for queue in w.spec.queues}
        for spec in new.workers:
            old = old_by_name.pop(spec.name, [])
            polite = bool(old) or not served.isdisjoint(spec.queues)
            fresh = self.spawn_worker(
                spec, self.generation, f"reload to generation {self.generation}", polite=polite
            )
            fresh.retire_when_ready = old
        for w in self.removed:
            log.info(
                "reload: %s is not in the config: it stops once generation %d is up",
                w.node,
                self.generation,
            )
        log.info("reload: generation %d starting", self.generation)
        return None

    def halt(self, mode: str) -> None:
        if self.halting == "cold" or self.halting == mode:
            return
        if not self.halting:
            self.notifier.stopping()
        self.halting = mode
        log.info("%s shutdown", mode)
        signum = signal.SIGTERM if mode == "warm" else signal.SIGQUIT
        self.cold_deadline = time.monotonic() + COLD_KILL_AFTER
        for w in self.workers:
            if w.pid:
                self.ask_to_leave(w, signum, f"{mode} shutdown")
            else:
                self.change_state(w, STOPPED, f"{mode} shutdown")

    # --- control plane -------------------------------------------------------------
    def read_control(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(100):  # bounded: a flood cannot starve the rest of the loop
            request = self.control.recv(sock)
            if request is None:
                if not self.control.waiting(sock):
                    return
                continue
            self.router.run(request)

    def targets(self, dest: list[str] | None) -> list[WorkerProc]:
        """The live workers addressed by `dest` (nodes or host names; None = all)."""
        live = [w for w in self.workers if w.pid and w.state in (STARTING, RUNNING)]
        if dest is None:
            return live
        return [w for w in live if w.node in dest or self.config.node in dest]

    def addressed(
        self, dest: list[str] | None, stopped: bool = False
    ) -> tuple[list[WorkerProc], bool]:
        """The supervised workers addressed by `dest`, down ones too (and, `stopped`, those
        shut down on purpose), and whether that is the whole host (for the host commands)."""
        whole = dest is None or self.config.node in dest
        chosen = [
            w
            for w in self.workers
            if (stopped or w.state != STOPPED) and (whole or w.node in (dest or ()))
        ]
        return chosen, whole

    # --- status, notify, run record ------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.watchdog_every and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.watchdog_every
        if now >= self.next_tick:
            self.next_tick = now + 1.0
            self.notifier.status(status_line(self))
            for w in self.workers:
                refresh_children(w)
            self.keep_state_dir()
            self.write_run_record()
            self.give_back_tasks()
            if self.unwritten_pidfile is not None:
                self.retry_pidfile()
            if self.metrics_server:
                self.metrics_server.health = health(self, now)
                self.metrics_server.readiness = readiness(self)

    def write_run_record(self) -> None:
        self.record_due, self.record_written_at = False, time.monotonic()
        processes = []
        for w in self.workers:
            if w.pid:
                processes += [w.record] if w.record else []
                processes += w.children.values()
        owners = [w.owner for w in self.workers if w.owner] + self.dead_owners
        owners += [owner for w in self.workers for owner in w.recovering]
        self.run_record.write(
            {
                "arbiter": self.arbiter_record,
                "run": self.run_id,
                "processes": processes,
                "owners": owners,
            }
        )

    def keep_state_dir(self) -> None:
        """Put back what was removed from under us (a /tmp cleaner, an rm -rf): the state
        dir's lock, the pidfile that `fleetd stop` reads, the control sockets. The run
        record is written again on its own."""
        if not self.lock_lost:
            try:
                self.lock_fd = orphans.keep_lock(self.lock_fd, self.config.state_dir)
            except (orphans.AlreadyRunning, OSError) as exc:
                self.lock_lost = True  # said once: a second fleet may run on the folder
                log.error("our lock on %s was removed, and: %s", self.config.state_dir, exc)
        if self.unwritten_pidfile is None and not os.path.lexists(self.pidfile):
            self.unwritten_pidfile = orphans.StateFile(self.pidfile)
        self.control.rebind_removed()

    def retry_pidfile(self) -> None:
        """Try the pidfile again: a start on a full disk could not write it."""
        assert self.unwritten_pidfile is not None
        if self.unwritten_pidfile.write(f"{os.getpid()}\n"):
            self.unwritten_pidfile = None
