"""`fleetctl dashboard`: a web dashboard of the fleet, a client of it as fleetctl is.

It asks every host over the control plane and reads the broker; the arbiters know
nothing of it. Needs the `dashboard` extra (`pip install 'fleetd[dashboard]'`).
"""

from __future__ import annotations

import signal
import socket
import sys
from typing import Any

from supervisor.config import dashboard_problem, read_token_file

SHUTDOWN_GRACE = 2  # seconds open live pages get to close at shutdown
REQUEST_WITHIN = 10.0  # seconds a connection has to send a whole request (see requests_in_time)


class DashboardError(Exception):
    """The dashboard cannot start as asked: one line saying why."""


def split_bind(bind: str) -> tuple[str, int]:
    """ "HOST:PORT" (HOST may be [v6]) -> (host, port); DashboardError if it is not that."""
    host, sep, port = bind.rpartition(":")
    # "²" is a digit to Python, not to int(); nor are 5000 digits a number to int()
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    bracketed = host.startswith("[") or host.endswith("]")
    if bracketed and not (host.startswith("[") and host.endswith("]") and len(host) > 2):
        host = ""  # "[::1" or "::1]": half an IPv6 address
    if not sep or not host or not digits or not 0 < int(port) < 65536:
        raise DashboardError(f"--bind {bind!r:.80}: give HOST:PORT, as 127.0.0.1:9810")
    return host.strip("[]"), int(port)


def read_token(path: str) -> str:
    """The bearer token in `path` (its first line); DashboardError if there is none."""
    try:
        return read_token_file(path)
    except ValueError as exc:
        raise DashboardError(str(exc)) from None


def checked_start(bind: str, token_file: str) -> tuple[str, int, str]:
    """Host, port and token to serve with; refuses a bind beyond loopback without a token."""
    host, port = split_bind(bind)
    problem = dashboard_problem(bind, token_file)
    if problem:
        raise DashboardError(f"--bind {bind!r:.80}: {problem}")
    return host, port, read_token(token_file)


def serve(control: Any, client: Any, config: Any, host: str, port: int, token: str) -> None:
    """Serve the dashboard of the fleet behind `control` (a ControlClient), `client` (a
    worker.Client) and `config` (its FleetConfig: state_dir, schedules) on host:port until
    TERM or INT; actions need `token` ("": none)."""
    import uvicorn

    from ctl.dashboard.app import Dashboard
    from ctl.dashboard.fleet import Fleet
    from ctl.dashboard.history import History, Sampler

    with listen(host, port) as listener:
        fleet = Fleet(control, client, config.schedules)
        history = History(config.state_dir)
        sampler = Sampler(fleet, history)
        sampler.start()
        dashboard = Dashboard(fleet, history, sampler, token)
        server = uvicorn.Server(
            uvicorn.Config(
                dashboard.app(),
                http=requests_in_time(),
                log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_GRACE,
                lifespan="off",
            )
        )
        dashboard.stopping = lambda: server.should_exit
        mode = "actions need the token" if token else "read-only"
        print(f"dashboard on http://{host}:{port}/ ({mode})", file=sys.stderr, flush=True)
        # Uvicorn stops on TERM and INT, then raises them again under the handlers it found:
        # by then the dashboard has ended as asked, so those do nothing.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        try:
            server.run(sockets=[listener])
        finally:
            sampler.stop()
            sampler.join()
            fleet.close()
            history.close()


def requests_in_time() -> type:
    """uvicorn's HTTP/1.1, but a connection that has not sent a whole request (line, headers
    and body) within REQUEST_WITHIN seconds of its start, or of its last answer, is closed:
    uvicorn waits for a request's headers as long as they take, so that clients that send
    them a byte at a time (slowloris) held the dashboard's descriptors until none was left."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestsInTime(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.request_due = self.loop.call_later(REQUEST_WITHIN, self.request_late)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.request_due.cancel()
            self.request_due = self.loop.call_later(REQUEST_WITHIN, self.request_late)

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(msg)
            # The request is answered and the connection closing: its handler's own answer
            # (a 401 given before the body's bad end was read) is for nobody. Uvicorn knew
            # only once the connection was lost, after it, and logged a traceback.
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()

        def connection_lost(self, exc: Exception | None) -> None:
            self.request_due.cancel()
            super().connection_lost(exc)

        def request_late(self) -> None:
            # Still arriving (not the answer going out: a live page's stream, whose client
            # may be MUST_CLOSE already, an HTTP/1.0 proxy's).
            if (
                self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
                and not self.transport.is_closing()
            ):
                self.transport.close()

    return RequestsInTime


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a bind that fails is the user's one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as exc:
        # create_server adds the address whole: "... (while attempting to bind on address ...)"
        reason = str(exc.strerror).partition(" (while attempting")[0]
        where = f"{host}:{port}"
        raise DashboardError(f"cannot listen on {where!r:.80}: {reason}") from None
