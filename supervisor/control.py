"""The arbiter's end of the control plane: bind, secure and validate its ZeroMQ sockets.

One ROUTER takes the requests of every `ipc://` endpoint and another those of every
`tcp://` endpoint, because CurveZMQ is set per socket: ipc is protected by its 0700
folder, tcp by CURVE with only the keys in `authorized_keys` let in. Each control
endpoint has an events endpoint beside it, on a PUB socket under the same rules:
`ipc:///x/control.sock` -> `ipc:///x/events.sock`, `tcp://h:7950` -> `tcp://h:7951`.

`curve_secret_key` is the path of a secret key file as `fleetctl keygen` writes it
(`fleet.key_secret`); `authorized_keys` is a folder of client public key files
(`*.key`), read once at start. A context holds one ZAP authenticator, so one
ControlServer with tcp endpoints per zmq.Context.

Nothing a peer sends can make this module raise: a bad request is answered with an
error reply and logged (one over 1 MiB too), and a frame over MAX_FRAME_READ makes libzmq
drop the connection unread. What a peer can make us log, it can make us log millions of
times: those lines are throttled (one of a kind per BAD_REQUEST_LOG_INTERVAL, with a count).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import stat
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import zmq

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

from worker.logs import shortened

from .config import ControlConfigError, ipc_path_problem
from .keys import KeyFileError, load_keypair
from .throttle import LogThrottle

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_TIMEOUT = 1.0  # seconds a host waits for its nodes' replies unless a request says
MAX_MESSAGE_SIZE = 1024 * 1024
# Frames libzmq takes in at all: one up to this size is read and refused with an error reply
# (over MAX_MESSAGE_SIZE); a larger one drops the peer's connection unread.
MAX_FRAME_READ = 4 * MAX_MESSAGE_SIZE
HANDSHAKE_MS = 3000  # a tcp client's CURVE handshake, at most
EVENTS_SOCKET_NAME = "events.sock"
# Seconds: of the lines a peer's bad requests cause (a refusal, a reply dropped), the first of
# a kind is logged, then at most one per interval, the last, with how many came.
BAD_REQUEST_LOG_INTERVAL = 1.0
ZAP_DOMAIN = "fleetd"

_encode_json = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class Request:
    """A valid control request, and where its reply goes.

    `{"v": 1, "id": ..., "cmd": ..., "args": {...}, "dest": [...] | null}`, and optionally
    `"timeout"`: seconds the host waits for its nodes' replies (a number > 0; null: 1), and
    `"limit"`: the host answers once that many nodes replied (an integer >= 1; null: all).
    """

    socket: zmq.Socket[bytes]
    routing_id: bytes
    id: str
    cmd: str
    args: dict[str, Any]
    dest: list[str] | None
    timeout: float = DEFAULT_TIMEOUT
    limit: int | None = None


def events_endpoint(control_endpoint: str) -> str:
    """Return the events (PUB) endpoint that goes with a control endpoint."""
    if control_endpoint.startswith("ipc://"):
        directory = os.path.dirname(control_endpoint[len("ipc://") :])
        return "ipc://" + os.path.join(directory, EVENTS_SOCKET_NAME)
    if control_endpoint.startswith("tcp://"):
        address, _, port = control_endpoint[len("tcp://") :].rpartition(":")
        digits = port.isascii() and port.isdigit() and len(port) <= 5  # int() of 5000 raises
        if address and digits and 0 < int(port) < 65535:
            return f"tcp://{address}:{int(port) + 1}"
        raise ControlConfigError(
            f"control endpoint {control_endpoint}: give a fixed port below 65535; "
            "events use the next one"
        )
    raise ControlConfigError(
        f"control endpoint {control_endpoint}: only ipc:// and tcp:// are supported"
    )


class ControlServer:
    """The bound control sockets of one arbiter; the arbiter polls `sockets()`."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        bind: list[str],
        curve_secret_key: str,
        authorized_keys: str,
        host: str,
    ) -> None:
        self._ctx = ctx
        self._host = host
        self._routers: list[zmq.Socket[bytes]] = []
        self._publishers: list[zmq.Socket[bytes]] = []
        self._socket_files: list[str] = []
        self._ipc_binds: list[tuple[zmq.Socket[bytes], str]] = []  # for rebind_removed
        self._rebind_failure = ""
        self._authenticator: ThreadAuthenticator | None = None
        self.peer_log = LogThrottle(log, BAD_REQUEST_LOG_INTERVAL)
        ipc = [endpoint for endpoint in bind if endpoint.startswith("ipc://")]
        tcp = [endpoint for endpoint in bind if endpoint.startswith("tcp://")]
        server_secret = check_bind(bind, curve_secret_key, authorized_keys)
        try:
            if ipc:
                self._bind_ipc(zmq.ROUTER, ipc)
                self._bind_ipc(zmq.PUB, [events_endpoint(endpoint) for endpoint in ipc])
            if tcp:
                self._start_authenticator(authorized_keys)
                events = [events_endpoint(endpoint) for endpoint in tcp]
                self._bind_tcp(zmq.ROUTER, tcp, server_secret)
                self._bind_tcp(zmq.PUB, events, server_secret)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def sockets(self) -> list[zmq.Socket[bytes]]:
        """The ROUTER sockets to register for POLLIN in the arbiter's zmq.Poller."""
        return list(self._routers)

    def recv(self, sock: zmq.Socket[bytes]) -> Request | None:
        """Read one message without blocking; None if there was none or it was refused."""
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            return None
        self.peer_log.flush()  # a flood that ended: its count is said with the next request
        routing_id = frames[0]
        try:
            return _parse_request(sock, routing_id, frames[1:])
        except _Refused as refused:
            self.peer_log.log(
                logging.WARNING,
                "control request refused peer=%s reason=%s",
                routing_id.hex(),
                refused,
            )
            self._send_error(sock, routing_id, refused.request_id, str(refused))
        except Exception as exc:  # noqa: BLE001 - whatever a request holds, never the arbiter's end
            # Every mistake of a peer's is a _Refused: this is a bug of ours, traceback and all.
            self.peer_log.log(
                logging.ERROR,
                "control request not understood peer=%s: %s",
                routing_id.hex(),
                _brief(exc),
                exc_info=True,
            )
            reason = f"bad request: {type(exc).__name__}: {str(exc)[:200]}"
            self._send_error(sock, routing_id, None, reason)
        return None

    def waiting(self, sock: zmq.Socket[bytes]) -> bool:
        """Whether another message waits on `sock`."""
        try:
            return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
        except zmq.ZMQError:
            return False

    def reply(self, req: Request, replies: dict[str, Any]) -> None:
        """Answer `req` with this host's replies, one per node."""
        try:
            data = _encode_json(
                {"v": VERSION, "id": req.id, "host": self._host, "replies": replies}
            )
        except (TypeError, ValueError) as exc:
            log.error("control reply is not JSON cmd=%s error=%s", req.cmd, exc)
            self.reply_error(req, f"the reply to {req.cmd} could not be encoded: {exc}")
            return
        self._send(req.socket, req.routing_id, data)

    def reply_error(self, req: Request, message: str) -> None:
        """Answer `req` with an error instead of replies."""
        self._send_error(req.socket, req.routing_id, req.id, message)

    def publish(self, event: dict[str, Any]) -> None:
        """Send an event to every subscriber; dropped, never waited on, when they lag."""
        try:
            data = _encode_json(event).encode()
        except (TypeError, ValueError) as exc:
            log.error("event is not JSON error=%s", exc)
            return
        for publisher in self._publishers:
            try:
                publisher.send(data, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("event dropped error=%s", exc)

    def close(self) -> None:
        """Close the sockets, stop the authenticator, remove the socket files. Idempotent."""
        for sock in self._routers + self._publishers:
            sock.close(linger=0)
        self._routers.clear()
        self._publishers.clear()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        for path in self._socket_files:
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
        self._socket_files.clear()

    def _bind_ipc(self, kind: int, endpoints: list[str]) -> None:
        sock = self._new_socket(kind)
        for endpoint in dict.fromkeys(endpoints):
            path = endpoint[len("ipc://") :]
            _secure_directory(os.path.dirname(os.path.abspath(path)), endpoint)
            _remove_stale_socket(path, endpoint)
            _bind_private(sock, endpoint)
            self._socket_files.append(path)
            self._ipc_binds.append((sock, endpoint))

    def rebind_removed(self) -> None:
        """Bind again each ipc endpoint whose socket file was removed while we serve (a
        /tmp cleaner, an rm -rf of the state dir), for fleetctl to find us there again.
        One that cannot be is tried again at the next call, and said once."""
        for sock, endpoint in self._ipc_binds:
            path = endpoint[len("ipc://") :]
            if os.path.lexists(path):
                continue
            with contextlib.suppress(zmq.ZMQError):  # its file is gone, not its listener
                sock.unbind(endpoint)
            try:
                _secure_directory(os.path.dirname(os.path.abspath(path)), endpoint)
                _bind_private(sock, endpoint)
            except ControlConfigError as exc:
                if str(exc) != self._rebind_failure:
                    log.error("%s", exc)
                self._rebind_failure = str(exc)
            else:
                log.warning("the socket of %s was removed: bound again", endpoint)

    def _bind_tcp(self, kind: int, endpoints: list[str], server_secret: bytes) -> None:
        sock = self._new_socket(kind)
        sock.curve_server = True
        sock.curve_secretkey = server_secret
        # With a ZAP domain set and enforced, libzmq refuses every client when no
        # authenticator answers, instead of admitting all of them. (Enforcing with an
        # empty domain would skip the authenticator altogether.)
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        # A connection that never completes its handshake (no key, a port scanner, a flood)
        # holds a file descriptor of the arbiter's: let go after seconds, not libzmq's 30.
        sock.handshake_ivl = HANDSHAKE_MS
        for endpoint in endpoints:
            _bind(sock, endpoint)

    def _new_socket(self, kind: int) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        sock.linger = 0
        sock.maxmsgsize = MAX_FRAME_READ
        (self._routers if kind == zmq.ROUTER else self._publishers).append(sock)
        return sock

    def _start_authenticator(self, authorized_keys: str) -> None:
        from zmq.auth.thread import ThreadAuthenticator  # only tcp needs it (and asyncio)

        authenticator = ThreadAuthenticator(self._ctx, log=log)
        try:
            authenticator.start()
        except (zmq.ZMQError, RuntimeError) as exc:
            authenticator.stop()
            raise ControlConfigError(
                f"cannot start the CURVE authenticator: {exc} (one per zmq.Context)"
            ) from None
        self._authenticator = authenticator
        authenticator.configure_curve(domain=ZAP_DOMAIN, location=authorized_keys)

    def _send_error(
        self, sock: zmq.Socket[bytes], routing_id: bytes, request_id: str | None, message: str
    ) -> None:
        self._send(
            sock, routing_id, _encode_json({"v": VERSION, "id": request_id, "error": message})
        )

    def _send(self, sock: zmq.Socket[bytes], routing_id: bytes, data: str) -> None:
        try:
            sock.send_multipart([routing_id, data.encode()], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.peer_log.log(
                logging.WARNING, "control reply dropped peer=%s error=%s", routing_id.hex(), exc
            )


class _Refused(Exception):
    """A request that breaks the protocol; the message is the error reply."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


def _parse_request(sock: zmq.Socket[bytes], routing_id: bytes, body: list[bytes]) -> Request:
    size = sum(len(frame) for frame in body)
    if size > MAX_MESSAGE_SIZE:
        raise _Refused(f"message of {size} bytes is over 1 MiB")
    if len(body) != 1:
        raise _Refused(f"expected 1 frame, got {len(body)}")
    try:
        message = json.loads(body[0])
    except (ValueError, RecursionError):
        raise _Refused("message is not JSON") from None
    if not isinstance(message, dict):
        raise _Refused("message is not a JSON object")
    request_id = message.get("id")
    if not isinstance(request_id, str):
        raise _Refused('"id" must be a string')
    version = message.get("v")
    if type(version) is not int or version != VERSION:
        raise _Refused(f'"v" is {_brief(version)}; this server speaks {VERSION}', request_id)
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise _Refused('"cmd" must be a string', request_id)
    args = message.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise _Refused('"args" must be an object', request_id)
    dest = message.get("dest")
    if dest is not None and not (
        isinstance(dest, list) and all(isinstance(node, str) for node in dest)
    ):
        raise _Refused('"dest" must be null or a list of strings', request_id)
    timeout, limit = _timeout_and_limit(message, request_id)
    return Request(sock, routing_id, request_id, cmd, args, dest, timeout, limit)


def _timeout_and_limit(message: dict[str, Any], request_id: str) -> tuple[float, int | None]:
    timeout = message.get("timeout")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    try:
        seconds = float(timeout) if number else math.nan
    except OverflowError:  # an integer of hundreds of digits
        seconds = math.inf
    if not 0 < seconds < math.inf:
        raise _Refused('"timeout" must be a number of seconds > 0', request_id)
    limit = message.get("limit")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise _Refused('"limit" must be null or an integer >= 1', request_id)
    return seconds, limit


def _check_ipc_path(endpoint: str) -> None:
    path = endpoint[len("ipc://") :]
    problem = ipc_path_problem(path)
    if problem:
        raise ControlConfigError(f"control endpoint {endpoint} {problem}")
    if os.path.basename(path) == EVENTS_SOCKET_NAME:
        raise ControlConfigError(
            f"control endpoint {endpoint}: {EVENTS_SOCKET_NAME} is the events socket's name"
        )


def check_bind(bind: list[str], curve_secret_key: str, authorized_keys: str) -> bytes:
    """What binding `bind` needs that can be checked without binding (its endpoints' form,
    the ipc paths, the CURVE keys): ControlConfigError if any is wrong, else the server's
    secret key (b"" without tcp). `fleetd check` asks it too, as `fleetd start` does."""
    for endpoint in bind:
        events_endpoint(endpoint)
        if endpoint.startswith("ipc://"):
            _check_ipc_path(endpoint)
    tcp = [endpoint for endpoint in bind if endpoint.startswith("tcp://")]
    return _curve_server_secret(tcp, curve_secret_key, authorized_keys)


def _curve_server_secret(tcp: list[str], curve_secret_key: str, authorized_keys: str) -> bytes:
    """Check the CURVE settings that tcp endpoints need; return the server's secret key."""
    if not tcp:
        return b""
    if not curve_secret_key or not authorized_keys:
        raise ControlConfigError(
            f"control endpoint {tcp[0]}: a tcp:// bind needs [control] curve_secret_key and "
            "authorized_keys (make keys with fleetctl keygen)"
        )
    try:
        _, secret = load_keypair(curve_secret_key)
    except KeyFileError as exc:
        raise ControlConfigError(f"control.curve_secret_key: {exc}") from None
    if not os.path.isdir(authorized_keys):
        raise ControlConfigError(f"control.authorized_keys: {authorized_keys} is not a folder")
    for name in sorted(os.listdir(authorized_keys)):  # libzmq's reader would block on a FIFO
        path = os.path.join(authorized_keys, name)
        if name.endswith(".key") and not os.path.isfile(path):
            raise ControlConfigError(f"control.authorized_keys: {path} is not a regular file")
    try:
        import zmq.auth

        allowed = zmq.auth.load_certificates(authorized_keys)
    except (OSError, ValueError) as exc:
        raise ControlConfigError(f"control.authorized_keys: {exc}") from None
    if not allowed:
        log.warning("no *.key file in %s: no client can connect over tcp", authorized_keys)
    return secret


def _secure_directory(directory: str, endpoint: str) -> None:
    """Make the socket's folder exist, be ours and be 0700."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as exc:
        raise ControlConfigError(f"control endpoint {endpoint}: {exc}") from None
    if info.st_uid != os.geteuid():
        raise ControlConfigError(
            f"control endpoint {endpoint}: {directory} belongs to uid {info.st_uid}, not to us; "
            "give the socket a folder of its own"
        )
    if stat.S_IMODE(info.st_mode) == 0o700:
        return
    if info.st_mode & stat.S_ISVTX:
        raise ControlConfigError(
            f"control endpoint {endpoint}: {directory} is a shared folder; "
            "give the socket a folder of its own"
        )
    log.warning("chmod 0700 %s, the folder of %s", directory, endpoint)
    try:
        os.chmod(directory, 0o700)
    except OSError as exc:
        raise ControlConfigError(f"control endpoint {endpoint}: {exc}") from None


def _remove_stale_socket(path: str, endpoint: str) -> None:
    """Unlink a socket file left by a dead process; refuse one that someone still listens on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlConfigError(f"control endpoint {endpoint}: {exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlConfigError(f"control endpoint {endpoint}: {path} exists and is no socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError:
            return
        else:
            raise ControlConfigError(
                f"control endpoint {endpoint} is in use by another process (a running fleetd?)"
            )
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ControlConfigError(f"control endpoint {endpoint}: {exc}") from None


def _bind_private(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Bind an ipc endpoint, its socket file ours alone (0600)."""
    previous_umask = os.umask(0o077)
    try:
        _bind(sock, endpoint)
    finally:
        os.umask(previous_umask)


def _bind(sock: zmq.Socket[bytes], endpoint: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ControlConfigError(f"cannot bind control endpoint {endpoint}: {exc}") from None


def _brief(value: Any) -> str:
    return shortened(repr(value), 40)
