"""`fleetd start`'s broker probe (supervisor/probe.py): the socket PING answers for a Redis
that answers, and every doubt goes to the client's probe, whose line the user sees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from supervisor.probe import answers_ping, broker_problem
from tests.brokers.conftest import REDIS_URL, require_redis
from tests.redisserver import RedisServer, free_port, start_redis

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis whose default user needs the password "pw", and a user "ann" with
    the password "secret" who may run anything."""
    server = start_redis(tmp_path, appendonly=False)
    try:
        client = redis.Redis(port=server.port)
        client.execute_command("ACL", "SETUSER", "ann", "on", ">secret", "~*", "&*", "+@all")
        client.config_set("requirepass", "pw")
        client.close()
        yield server
    finally:
        server.kill()


def test_the_shared_redis_answers_and_has_no_problem() -> None:
    require_redis(REDIS_URL)
    assert answers_ping(REDIS_URL)
    assert answers_ping(REDIS_URL + "?prefix=other")  # fleetd's own parameter
    assert broker_problem(REDIS_URL) is None


def test_a_port_nobody_listens_on_does_not_answer_and_the_client_says_why() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not answers_ping(url)
    problem = broker_problem(url)
    assert problem is not None and "Connection refused" in problem


def test_a_database_out_of_range_is_the_clients_to_explain() -> None:
    require_redis(REDIS_URL)
    url = REDIS_URL.rsplit("/", 1)[0] + "/999999"
    assert not answers_ping(url)
    assert broker_problem(url) is not None


def test_passwords_and_users_are_sent(locked: RedisServer) -> None:
    port = locked.port
    assert answers_ping(f"redis://:pw@127.0.0.1:{port}/0")
    assert answers_ping(f"redis://ann:secret@127.0.0.1:{port}/0")
    assert answers_ping(f"redis://ann:s%65cret@127.0.0.1:{port}/0")  # percent-encoded
    for url in (
        f"redis://127.0.0.1:{port}/0",  # no password: NOAUTH
        f"redis://:wrong@127.0.0.1:{port}/0",
        f"redis://ann:wrong@127.0.0.1:{port}/0",
    ):
        assert not answers_ping(url), url
        problem = broker_problem(url)
        assert problem is not None and "wrong" not in problem, url  # never the password


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///queue.db",
        "rediss://127.0.0.1:6379/0",  # TLS: the client's
        "redis://127.0.0.1:6379/0?socket_timeout=5",  # options: the client's
        "redis://127.0.0.1:6379/zero",
        "redis://127.0.0.1:notaport/0",
    ],
)
def test_what_the_socket_probe_does_not_speak_goes_to_the_client(url: str) -> None:
    assert not answers_ping(url)
