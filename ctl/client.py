"""fleetctl's end of the control plane: ask every host at once, gather replies, tail events.

One DEALER per host endpoint. `call` sends the request to all of them, then returns
as soon as every host has answered; only a silent host costs the full timeout, and
it is named in `Result.missing`. Each host gets NODE_SHARE of that timeout for its own
nodes: a host with a silent node still answers in time, naming the node. A `tcp://`
endpoint needs the client's key pair and that server's public key (CurveZMQ); an
`ipc://` endpoint needs neither.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Collection, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import zmq

from supervisor.control import MAX_MESSAGE_SIZE, VERSION, ControlConfigError, events_endpoint

NODE_SHARE = 0.8  # of the timeout that a host waits for its nodes


@dataclass
class Result:
    """What a broadcast brought back: replies by node, silent hosts, the hosts' errors.

    Hosts are named as the client's `hosts` map names them, else by their endpoint.
    """

    replies: dict[str, Any]
    missing: list[str]
    elapsed: float
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self, **extra: Any) -> str:
        """The `--json` output: replies, missing and elapsed, errors if there are any, and
        what a command adds (`extra`)."""
        out: dict[str, Any] = {
            "replies": self.replies,
            "missing": self.missing,
            "elapsed": round(self.elapsed, 3),
        }
        if self.errors:
            out["errors"] = self.errors
        return json.dumps({**out, **extra})


class ControlClient:
    """A connection to the control endpoints of one or more hosts.

    `client_keys` is the (public, secret) z85 pair and `server_keys` maps each tcp
    endpoint to its server's z85 public key (see supervisor.keys). `hosts` maps an endpoint
    to the host expected behind it, the name `missing` and `errors` use for it (default:
    the endpoint itself). Raises ControlConfigError for an endpoint it cannot use.
    """

    def __init__(
        self,
        endpoints: list[str],
        timeout: float,
        client_keys: tuple[bytes, bytes] | None = None,
        server_keys: dict[str, bytes] | None = None,
        hosts: dict[str, str] | None = None,
        own: Collection[str] = (),
    ) -> None:
        self._endpoints = list(dict.fromkeys(endpoints))
        self._timeout = timeout
        # This host's endpoints: asked whatever --dest names, as its node may be another
        # than its config says (`fleetd start --node`); its arbiter picks what dest names.
        self._own = set(own)
        self._client_keys = client_keys
        self._server_keys = server_keys or {}
        self._hosts = hosts or {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        try:
            for endpoint in self._endpoints:
                self._dealers[endpoint] = self._connect(zmq.DEALER, endpoint, endpoint)
        except BaseException:
            self.close()
            raise

    def twin(self) -> ControlClient:
        """A client of its own to the same hosts, with the same keys and timeout: for a call
        that must not wait behind this one's (a ZeroMQ socket belongs to one thread)."""
        return ControlClient(
            self._endpoints,
            self._timeout,
            self._client_keys,
            self._server_keys,
            self._hosts,
            self._own,
        )

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(
        self,
        cmd: str,
        args: dict[str, Any] | None = None,
        dest: list[str] | None = None,
        limit: int | None = None,
        skip: Collection[str] = (),
    ) -> Result:
        """Send `cmd` to every endpoint; wait until all answered or the timeout passed.

        With `limit`, return as soon as that many nodes replied (hosts that had not
        answered by then are not missing: they were not needed); each host answers once
        that many of its own nodes did. The hosts named in `skip` (as `missing` names them)
        are not asked.
        """
        request_id = uuid.uuid4().hex
        request = json.dumps(
            {
                "v": VERSION,
                "id": request_id,
                "cmd": cmd,
                "args": args or {},
                "dest": dest,
                "timeout": self._timeout * NODE_SHARE,
                "limit": limit or None,
            },
            separators=(",", ":"),
        ).encode()
        if len(request) > MAX_MESSAGE_SIZE:
            raise ValueError(f"the {cmd} request is {len(request)} bytes, over the 1 MiB limit")
        start = time.monotonic()
        result = Result(replies={}, missing=[], elapsed=0.0)
        waiting: dict[zmq.Socket[bytes], str] = {}
        poller = zmq.Poller()
        for endpoint, dealer in self._dealers.items():
            if not self._may_hold(endpoint, dest) or self._name(endpoint) in skip:
                continue
            try:
                dealer.send(request, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                result.errors[self._name(endpoint)] = f"cannot send: {exc}"
                continue
            waiting[dealer] = endpoint
            poller.register(dealer, zmq.POLLIN)
        deadline = start + self._timeout
        while waiting and not (limit and len(result.replies) >= limit):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # In slices: zmq takes whole milliseconds, and --timeout 1e308 is none.
            for dealer, _ in poller.poll(max(1, math.ceil(min(remaining, 60.0) * 1000))):
                if _take_reply(dealer, request_id, self._name(waiting[dealer]), result):
                    poller.unregister(dealer)
                    del waiting[dealer]
        if not (limit and len(result.replies) >= limit):
            result.missing = [self._name(endpoint) for endpoint in waiting.values()]
        for endpoint in waiting.values():
            self._renew(endpoint)
        result.elapsed = time.monotonic() - start
        return result

    def _renew(self, endpoint: str) -> None:
        """A fresh socket for a host that did not answer: ZeroMQ would keep the request
        queued while the host is down and deliver it once it is back, where the caller was
        told it failed (a long-lived client's: the dashboard's `pool grow`, long after its
        502). What a hung host read already, it may still carry out."""
        fresh = self._connect(zmq.DEALER, endpoint, endpoint)  # first: it may fail (EMFILE)
        self._dealers.pop(endpoint).close(linger=0)
        self._dealers[endpoint] = fresh

    def _may_hold(self, endpoint: str, dest: list[str] | None) -> bool:
        """Whether the host at `endpoint` may hold a node or host of `dest` (all: everyone).
        One whose name is known and is none of theirs is not asked: down, it would make a
        command aimed at live hosts wait out the timeout and fail."""
        host = self._hosts.get(endpoint)
        if not dest or host is None or endpoint in self._own:
            return True
        return any(d.rpartition("@")[2] == host for d in dest)

    def subscribe_events(
        self, endpoints: list[str] | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """Subscribe to the events of the hosts at these control endpoints (default: the
        client's) now, and yield them as they come.

        Runs until the caller stops iterating; events published before the
        subscription reached a host are not seen (ZeroMQ PUB/SUB).
        """
        subscribers = [
            self._connect(zmq.SUB, endpoint, events_endpoint(endpoint))
            for endpoint in dict.fromkeys(endpoints or list(self._dealers))
        ]
        for subscriber in subscribers:
            subscriber.subscribe(b"")
        return _events(subscribers)

    def close(self) -> None:
        """Close every socket at once, dropping unsent requests."""
        self._dealers.clear()
        self._ctx.destroy(linger=0)

    def _name(self, endpoint: str) -> str:
        """The host expected behind an endpoint, or the endpoint itself: how results name it."""
        return self._hosts.get(endpoint, endpoint)

    def _connect(self, kind: int, control_endpoint: str, address: str) -> zmq.Socket[bytes]:
        if not control_endpoint.startswith(("ipc://", "tcp://")):  # as a host binds them
            raise ControlConfigError(
                f"control endpoint {control_endpoint}: only ipc:// and tcp:// are supported"
            )
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.linger = 0
        try:
            if control_endpoint.startswith("tcp://"):
                self._secure(sock, control_endpoint)
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close()
            raise ControlConfigError(f"cannot connect to {address}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _secure(self, sock: zmq.Socket[bytes], endpoint: str) -> None:
        server_key = self._server_keys.get(endpoint)
        if self._client_keys is None or server_key is None:
            raise ControlConfigError(
                f"endpoint {endpoint}: tcp needs a client key pair and the server's public key "
                "(make keys with fleetctl keygen)"
            )
        sock.curve_publickey, sock.curve_secretkey = self._client_keys
        sock.curve_serverkey = server_key


def _events(subscribers: list[zmq.Socket[bytes]]) -> Generator[dict[str, Any], None, None]:
    """The events the subscribers receive, as dicts, until the caller stops iterating."""
    poller = zmq.Poller()
    for subscriber in subscribers:
        poller.register(subscriber, zmq.POLLIN)
    try:
        while True:
            for subscriber, _ in poller.poll():
                while True:
                    try:
                        data = subscriber.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        event = json.loads(data)
                    except (ValueError, RecursionError):
                        continue
                    if isinstance(event, dict):
                        yield event
    finally:
        for subscriber in subscribers:
            subscriber.close(linger=0)


def _take_reply(dealer: zmq.Socket[bytes], request_id: str, host: str, result: Result) -> bool:
    """Read what `dealer` has; record the reply to `request_id` and say whether it came."""
    while True:
        try:
            data = dealer.recv(zmq.NOBLOCK)
        except zmq.Again:
            return False
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            result.errors[host] = "the reply is not JSON"
            return True
        if not isinstance(message, dict) or message.get("id") != request_id:
            continue  # the late answer to an earlier call
        if "error" in message:
            result.errors[host] = str(message["error"])
        elif isinstance(message.get("replies"), dict):
            result.replies.update(message["replies"])
        else:
            result.errors[host] = "the reply has no replies"
        return True
