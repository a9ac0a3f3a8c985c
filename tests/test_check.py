"""`fleetd check` imports the task modules as a worker will, and names the one that fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fleet import fleetd

CONFIG = '[fleet]\nimports = ["tasks", "more"]\n\n[[worker]]\nname = "w"\n'


def check(
    folder: Path, tasks: str, more: str = "X = 1\n", config: str = CONFIG
) -> subprocess.CompletedProcess[str]:
    (folder / "fleet.toml").write_text(config)
    (folder / "tasks.py").write_text(tasks)
    (folder / "more.py").write_text(more)
    return fleetd("check", "-c", str(folder / "fleet.toml"))


@pytest.mark.parametrize(
    ("source", "line", "error"),
    [
        ("import os\n\nraise RuntimeError('no database')\n", 3, "RuntimeError: no database"),
        ("def broken(:\n    pass\n", 1, "SyntaxError"),
        ("X = 1\nimport no_such_module_here\n", 2, "ModuleNotFoundError"),
        # Raised in fleetd's own code (a @task option it refuses): the task module's line.
        ("from fleetd import task\n\n@task(rate_limit='5/x')\ndef f():\n    pass\n", 3, "rate"),
    ],
)
def test_a_module_that_fails_at_import_is_named_with_file_and_line(
    tmp_path: Path, source: str, line: int, error: str
) -> None:
    done = check(tmp_path, "X = 1\n", more=source)
    assert done.returncode == 2
    [message] = done.stderr.strip().splitlines()
    assert "fleet.imports" in message and "'more'" in message
    assert f"{tmp_path / 'more.py'}:{line}" in message and error in message


def test_a_module_that_exits_at_import_is_reported(tmp_path: Path) -> None:
    done = check(tmp_path, "import os\nos._exit(3)\n")
    assert done.returncode == 2
    assert "exit code 3" in done.stderr and done.stderr.count("\n") == 1


def test_modules_that_import_cleanly_pass_even_when_they_print(tmp_path: Path) -> None:
    done = check(tmp_path, "print('hello from tasks')\n")
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


@pytest.mark.parametrize(
    ("dashboard", "refused"),
    [
        ('bind = "0.0.0.0:9810"', True),
        ('bind = "[::]:9810"', True),
        ('bind = "192.0.2.7:9810"', True),
        ('bind = "0.0.0.0:9810"\ntoken_file = "dashboard.token"', False),
        ('bind = "127.0.0.1:9810"', False),
        ('bind = "[::1]:9810"', False),
        ('bind = "localhost:9810"', False),
    ],
)
def test_check_names_a_dashboard_open_to_other_hosts_without_a_token(
    tmp_path: Path, dashboard: str, refused: bool
) -> None:
    """What `fleetctl dashboard` refuses at its start (actions from any host, no token),
    `fleetd check` names before, with the key."""
    (tmp_path / "fleet.toml").write_text(CONFIG + f"\n[dashboard]\n{dashboard}\n")
    (tmp_path / "tasks.py").write_text("X = 1\n")
    (tmp_path / "more.py").write_text("X = 1\n")
    (tmp_path / "dashboard.token").write_text("t0ken\n")
    done = fleetd("check", "-c", str(tmp_path / "fleet.toml"))
    if refused:
        assert done.returncode == 2
        [message] = done.stderr.strip().splitlines()
        assert "dashboard.bind" in message and "token_file" in message, message
    else:
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("content", "problem"), [(None, "cannot read it"), ("\n", "no token")])
def test_check_names_a_dashboard_token_file_the_dashboard_would_refuse(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    """Check said ok, and `fleetctl dashboard` then refused to start."""
    (tmp_path / "fleet.toml").write_text(CONFIG + '\n[dashboard]\ntoken_file = "dashboard.token"\n')
    (tmp_path / "tasks.py").write_text("X = 1\n")
    (tmp_path / "more.py").write_text("X = 1\n")
    if content is not None:
        (tmp_path / "dashboard.token").write_text(content)
    done = fleetd("check", "-c", str(tmp_path / "fleet.toml"))
    assert done.returncode == 2
    [message] = done.stderr.strip().splitlines()
    assert "dashboard token_file" in message and problem in message, message


def test_check_names_a_tcp_bind_whose_port_has_thousands_of_digits(tmp_path: Path) -> None:
    """int() of the port (for the events endpoint, the next one) raised past its digit limit."""
    bind = f"tcp://127.0.0.1:{'9' * 5000}"
    control = f'[control]\nbind = ["{bind}"]\ncurve_secret_key = "k"\nauthorized_keys = "a"\n'
    done = check(tmp_path, "X = 1\n", config=CONFIG + control)
    assert done.returncode == 2
    [message] = done.stderr.strip().splitlines()
    assert "give a fixed port below 65535" in message, message
