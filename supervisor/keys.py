"""CurveZMQ key files: `fleetctl keygen` writes a pair, the control server and client load them.

`keygen(DIR)` writes two files in the format of pyzmq's `zmq.auth` (and czmq):

- `DIR/fleet.key`: the public key. Copy it into a server's `authorized_keys`
  folder (under any name ending in `.key`) to let its owner in, or give it to
  clients as the server's public key.
- `DIR/fleet.key_secret`: the public and the secret key, mode 0600. A server
  names it in `[control] curve_secret_key`; a client keeps it for itself.
"""

from __future__ import annotations

import datetime
import os

import zmq
import zmq.auth

PUBLIC_FILE = "fleet.key"
SECRET_FILE = "fleet.key_secret"


class KeyFileError(ValueError):
    """A key file is missing, unreadable, or lacks the key asked for."""


def keygen(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """Write a new key pair into `directory` (created 0700); return (public_path, secret_path).

    Refuses with FileExistsError to overwrite an existing pair.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public_key, secret_key = zmq.curve_keypair()
    public_path = os.path.join(directory, PUBLIC_FILE)
    secret_path = os.path.join(directory, SECRET_FILE)
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; remove it or choose another folder")
    created = datetime.datetime.now().isoformat(timespec="seconds")
    _write_exclusive(
        secret_path,
        0o600,
        f"#   ZeroMQ CURVE **Secret** Certificate, written by fleetctl keygen on {created}\n"
        "#   Never give this file to anybody.\n\n"
        f'curve\n    public-key = "{public_key.decode()}"\n'
        f'    secret-key = "{secret_key.decode()}"\n',
    )
    _write_exclusive(
        public_path,
        0o644,
        f"#   ZeroMQ CURVE Public Certificate, written by fleetctl keygen on {created}\n\n"
        f'curve\n    public-key = "{public_key.decode()}"\n',
    )
    return public_path, secret_path


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """Return (public, secret) z85 keys from a secret key file such as `fleet.key_secret`."""
    public_key, secret_key = _load(path)
    if secret_key is None:
        raise KeyFileError(f"{os.fspath(path)} holds no secret-key; give the *.key_secret file")
    return public_key, secret_key


def load_public(path: str | os.PathLike[str]) -> bytes:
    """Return the z85 public key from a public (or secret) key file."""
    return _load(path)[0]


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read
        raise KeyFileError(f"cannot read key file {os.fspath(path)}: not a regular file")
    try:
        public_key, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {os.fspath(path)}: {exc}") from None
    for key in (public_key, secret_key):
        if key is not None and (len(key) != 40 or not _z85(key)):
            raise KeyFileError(f"{os.fspath(path)} holds a key that is not 40 z85 characters")
    return public_key, secret_key


def _z85(key: bytes) -> bool:
    """Whether `key` decodes as Z85 (libzmq refuses one that does not only when the socket
    takes it: `fleetd start` ended in a ZMQError's traceback after check said ok)."""
    from zmq.utils import z85

    try:
        z85.decode(key)
    except (KeyError, ValueError, TypeError):
        return False
    return True


def _write_exclusive(path: str, mode: int, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
    os.chmod(path, mode)
