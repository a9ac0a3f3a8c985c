"""Config loading: defaults, inheritance, relative paths, and one clear line for every bad file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from supervisor.config import ConfigError, load, parse_rate, parse_size
from tests.fleet import FLEETCTL, FLEETD, fleetd

GOOD = """
[fleet]
node = "h1"
imports = ["tasks"]
[defaults]
concurrency = 3
time_limit = 60
[[worker]]
name = "a"
[[worker]]
name = "b"
queues = ["images"]
concurrency = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "tasks.py").write_text("")
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_defaults_are_inherited_and_paths_resolved_against_the_config_folder(
    tmp_path: Path,
) -> None:
    config = load(str(write(tmp_path, GOOD)))
    a, b = config.workers
    assert (a.node, a.concurrency, a.time_limit, a.queues) == ("a@h1", 3, 60, ["default"])
    assert (b.node, b.concurrency, b.time_limit, b.queues) == ("b@h1", 1, 60, ["images"])
    assert config.broker == f"sqlite:///{tmp_path}/queue.db"
    assert config.state_dir == str(tmp_path / "state")
    assert config.pythonpath == [str(tmp_path)]
    assert config.control.bind == [f"ipc://{tmp_path}/state/control.sock"]
    assert a.prefetch == 1 and a.acks_late is True and a.max_deliveries == 3 and a.lease == 30


def test_absolute_sqlite_url_is_kept(tmp_path: Path) -> None:
    config = load(
        str(
            write(
                tmp_path, GOOD.replace('node = "h1"', 'node = "h1"\nbroker = "sqlite:////var/q.db"')
            )
        )
    )
    assert config.broker == "sqlite:////var/q.db"


BAD = [
    ("[fleet\n", "-", "TOML syntax error"),
    (GOOD + "\n[fleet2]\n", "fleet2", "unknown section"),
    (
        GOOD.replace("[defaults]", "[defaults]\nconcurency = 2"),
        "defaults.concurency",
        "unknown key",
    ),
    (GOOD.replace("concurrency = 3", 'concurrency = "three"'), "defaults.concurrency", "integer"),
    (GOOD.replace("concurrency = 3", "concurrency = 0"), "defaults.concurrency", ">= 1"),
    # as `pool grow` past it: a typo that forked thousands of children at start
    (GOOD.replace("concurrency = 3", "concurrency = 100000"), "defaults.concurrency", "<= 1024"),
    (GOOD.replace('name = "b"', 'name = "a"'), "worker[1].name", "duplicate worker name"),
    (
        GOOD.replace("concurrency = 3", "concurrency = 3\nasync_concurrency = 0"),
        "defaults.async_concurrency",
        "from 1 to",
    ),
    (
        GOOD.replace('name = "a"\n', 'name = "a"\nasync_concurrency = "x"\n', 1),
        "worker[0].async_concurrency",
        "integer",
    ),
    (
        GOOD.replace('imports = ["tasks"]', 'imports = ["missing_module"]'),
        "fleet.imports",
        "not found",
    ),
    (
        GOOD.replace("time_limit = 60", 'time_limit = 60\nmax_memory_per_child = "lots"'),
        "defaults.max_memory_per_child",
        "size",
    ),
    (  # bytes, where Celery's --max-memory-per-child counts KiB: every task would recycle
        GOOD.replace("time_limit = 60", "time_limit = 60\nmax_memory_per_child = 512"),
        "defaults.max_memory_per_child",
        "with its unit",
    ),
    (GOOD + '\n[rate_limits]\n"tasks.x" = "fast"\n', "rate_limits.tasks.x", "not N"),
    (GOOD + '\n[rate_limits]\n"tasks.x" = "١/s"\n', "rate_limits.tasks.x", "rate '١/s'"),
    (
        GOOD + f'\n[rate_limits]\n"tasks.x" = "0.{"0" * 400}1/s"\n',
        "rate_limits.tasks.x",
        "too small",
    ),
    (GOOD.replace('node = "h1"', 'node = "h1"\nbroker = "amqp://x"'), "fleet.broker", "sqlite"),
    # What redis-py took silently (database 0 for "notadb") or failed on at the first call.
    *(
        (GOOD.replace('node = "h1"', f'node = "h1"\nbroker = "{url}"'), "fleet.broker", problem)
        for url, problem in [
            ("redis://127.0.0.1:6379/notadb", "a number from 0 to 2147483647, got 'notadb'"),
            ("redis://127.0.0.1:6379/2147483648", "got '2147483648'"),  # Redis's own error
            ("redis://127.0.0.1:6379/١", "got '١'"),
            ("redis://127.0.0.1:99999/0", "Port out of range"),
            ("redis://[::1/0", "Invalid IPv6 URL"),
            ("unix://", "needs the socket's path"),
            # A traceback at the first call (UnicodeError: label too long), which check took.
            (f"redis://{'h' * 64}:6379/0", "is no host name"),
            ("redis://a..b:6379/0", "is no host name"),
        ]
    ),
    (GOOD + '\n[control]\nbind = ["tcp://127.0.0.1:7950"]\n', "control.bind", "curve_secret_key"),
    (
        GOOD.replace('[[worker]]\nname = "a"\n', '[[worker]]\nqueues = ["x"]\n'),
        "worker[0].name",
        "required",
    ),
    ("[fleet]\nimports = []\n", "worker", "at least one"),
    (GOOD + '\n[control]\nendpoints = { "h 2" = "tcp://h2:7950" }\n', "control.endpoints", "table"),
    (GOOD + '\n[control]\nendpoints = ["h2:7950"]\n', "control.endpoints", "ipc:// or tcp://"),
    (GOOD + '\n[metrics]\nbind = "127.0.0.1:99999"\n', "metrics.bind", "port from 1 to 65535"),
    # Each passed check, then ended start in a traceback or let nobody steer the host:
    (GOOD + '\n[metrics]\nbind = "127.0.0.1:9808\\n"\n', "metrics.bind", "host:port"),
    (GOOD + '\n[metrics]\nbind = "::9808"\n', "metrics.bind", "host:port"),
    (GOOD + "\n[control]\nbind = []\n", "control.bind", "non-empty list"),
    (GOOD.replace('name = "a"\n', 'name = "a\\n"\n', 1), "worker[0].name", "a name of"),
    (GOOD.replace('node = "h1"', 'node = "h1\\n"'), "fleet.node", "a name of"),
    # Past these, the worker died at its first task on every start, until FATAL:
    (
        GOOD.replace('node = "h1"', 'node = "h1"\nresult_ttl = 10000000000000000'),
        "fleet.result_ttl",
        "from 1 to 1,000,000,000",
    ),
    (
        GOOD.replace('name = "a"\n', 'name = "a"\nprefetch = 9223372036854775807\n', 1),
        "worker[0].prefetch",
        "from 0 to 1,000,000",
    ),
    (
        GOOD.replace('name = "a"\n', 'name = "a"\nasync_concurrency = 10000000\n', 1),
        "worker[0].async_concurrency",
        "from 1 to 1,000,000",
    ),
    # NaN and infinity: never a duration (on Redis a lease of inf or nan crashed every turn).
    (GOOD.replace("time_limit = 60", "time_limit = nan"), "defaults.time_limit", "finite"),
    (GOOD.replace("time_limit = 60", "time_limit = inf"), "defaults.time_limit", "finite"),
    (GOOD.replace('node = "h1"', 'node = "h1"\nlease = nan'), "fleet.lease", "finite"),
    (GOOD.replace('node = "h1"', 'node = "h1"\nlease = inf'), "fleet.lease", "finite"),
    (
        GOOD.replace('name = "a"\n', 'name = "a"\nshutdown_timeout = -inf\n', 1),
        "worker[0].shutdown_timeout",
        "finite",
    ),
    # TOML holds dates and NaN, a task's JSON does not: a date ended `fleetd start` in a traceback
    (
        GOOD + '[[schedule]]\nname = "s"\ntask = "tasks.add"\nevery = 10\nargs = [1979-05-27]\n',
        "schedule[0].args",
        "JSON",
    ),
    (
        GOOD + '[[schedule]]\nname = "s"\ntask = "tasks.add"\nevery = 10\nkwargs = {a = nan}\n',
        "schedule[0].kwargs",
        "JSON",
    ),
    # An empty queue name: the message says what is wrong with a list that is a list of strings
    (
        GOOD.replace('queues = ["images"]', 'queues = ["images", ""]'),
        "worker[1].queues",
        "non-empty",
    ),
    # Past what a number holds: OverflowError and int()'s digit limit ended check in a traceback
    (
        GOOD.replace("time_limit = 60", f'time_limit = 60\nmax_memory_per_child = "{"9" * 310}G"'),
        "defaults.max_memory_per_child",
        "too large",
    ),
    (GOOD + f'\n[metrics]\nbind = "127.0.0.1:{"9" * 5000}"\n', "metrics.bind", "host:port"),
    (GOOD + f'\n[dashboard]\nbind = "127.0.0.1:{"9" * 5000}"\n', "dashboard.bind", "host:port"),
    # Digits of other scripts: str.isdigit() took "١,٢" for 1,2
    (
        GOOD.replace("concurrency = 3", 'concurrency = 3\nautoscale = "١,٢"'),
        "defaults.autoscale",
        "got '١,٢'",
    ),
    # A lease Redis cannot take (PX 0, or past its clock): check passed, and every worker
    # with a [[schedule]] died at its first claim of the lead, until FATAL.
    *(
        (GOOD.replace('node = "h1"', f'node = "h1"\nlease = {lease}'), "fleet.lease", "0.001 to")
        for lease in ("0.0005", "0", "1e20")
    ),
    # "ipc://" named the config's folder: start made its parent (/etc) 0700, then refused it
    *(
        (GOOD + f'\n[control]\nbind = ["{bind}"]\n', "control.bind", "names no socket file")
        for bind in ("ipc://", "ipc:///etc/", "ipc://state/..")
    ),
]

# A NUL in a path, URL or name: open() and the like raised at check or start (or check said ok).
NUL_KEYS = [
    (GOOD.replace('node = "h1"', 'node = "h1"\npythonpath = ["\\u0000"]'), "fleet.pythonpath"),
    (GOOD.replace('node = "h1"', 'node = "h1"\nstate_dir = "st\\u0000ate"'), "fleet.state_dir"),
    (
        GOOD.replace('node = "h1"', 'node = "h1"\nbroker = "sqlite:///q\\u0000.db"'),
        "fleet.broker",
    ),
    (GOOD.replace('["tasks"]', '["tasks\\u0000"]'), "fleet.imports"),
    (GOOD + '\n[control]\nbind = ["ipc://c\\u0000.sock"]\n', "control.bind"),
    (GOOD + '\n[dashboard]\ntoken_file = "t\\u0000"\n', "dashboard.token_file"),
    (GOOD.replace('["images"]', '["im\\u0000ages"]'), "worker[1].queues"),
    (
        GOOD + '[[schedule]]\nname = "s\\u0000"\ntask = "tasks.add"\nevery = 10\n',
        "schedule[0].name",
    ),
]
BAD += [(text, key, "NUL character") for text, key in NUL_KEYS]


def test_endpoints_given_as_a_table_name_their_hosts(tmp_path: Path) -> None:
    text = GOOD + '\n[control]\nendpoints = { h2 = "tcp://10.0.0.2:7950", h3 = "tcp://h3:7950" }\n'
    control = load(str(write(tmp_path, text))).control
    assert control.endpoints == ["tcp://10.0.0.2:7950", "tcp://h3:7950"]
    assert control.hosts == {"tcp://10.0.0.2:7950": "h2", "tcp://h3:7950": "h3"}


@pytest.mark.parametrize(("text", "key", "problem"), BAD)
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert err.value.key == key
    assert problem in err.value.problem
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ") and "\n" not in message


LONG = "x" * 5000
OVERSIZED = [
    (GOOD + f'\n[metrics]\nbind = "127.0.0.1:{"9" * 5000}"\n', "metrics.bind"),
    (GOOD.replace('node = "h1"', f'node = "{LONG}!"'), "fleet.node"),
    (GOOD.replace('node = "h1"', f'node = "h1"\nbroker = "{LONG}"'), "fleet.broker"),
    (GOOD.replace('name = "b"', f'name = "{LONG}!"'), "worker[1].name"),
    (GOOD.replace('name = "b"', f'name = "{LONG}"\n[[worker]]\nname = "{LONG}"'), "worker[2].name"),
    (
        GOOD.replace("concurrency = 3", f'concurrency = 3\nautoscale = "1,{"9" * 5000}"'),
        "defaults.autoscale",
    ),
    (GOOD + f'\n[control]\nendpoints = ["{LONG}"]\n', "control.endpoints"),
    (GOOD.replace("[defaults]", f"[defaults]\n{LONG} = 1"), "defaults.x"),
    (GOOD + f"\n[{LONG}]\n", "x"),
    (
        GOOD.replace("time_limit = 60", f'time_limit = 60\nmax_memory_per_child = "{"9" * 5000}G"'),
        "defaults.max_memory_per_child",
    ),
]


@pytest.mark.parametrize(("text", "key"), OVERSIZED)
def test_an_oversized_value_is_quoted_short_in_its_error(
    tmp_path: Path, text: str, key: str
) -> None:
    """The error quoted all 5,000 characters of the value: a screenful for one line."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(str(path))
    assert err.value.key.startswith(key)
    assert len(str(err.value)) < len(f"{path}: ") + 400


@pytest.mark.parametrize(
    "broker",
    [
        f"redis://127.0.0.1:6379/{LONG}",
        f"redis://127.0.0.1:{LONG}/0",
        f"redis://{LONG}:6379/0",
    ],
)
@pytest.mark.parametrize("argv", [[FLEETD, "check"], [FLEETD, "start"], [FLEETCTL, "queues"]])
def test_an_oversized_broker_url_is_quoted_short_by_fleetd_and_fleetctl(
    tmp_path: Path, broker: str, argv: list[str]
) -> None:
    """A Redis URL whose database or port is no number: the line held all of it."""
    path = write(tmp_path, GOOD.replace('node = "h1"', f'node = "h1"\nbroker = "{broker}"'))
    out = subprocess.run([*argv, "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (2, "")
    [line] = out.stderr.splitlines()
    assert line.startswith(f"{Path(argv[0]).name}: ") and ": fleet.broker: " in line
    assert len(line) < 300, line[:300]
    assert not os.path.exists(tmp_path / "state" / "fleetd.pid")


@pytest.mark.parametrize("command", ["check", "start"])
@pytest.mark.parametrize(("text", "key", "problem"), BAD[:7])
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, command: str, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    out = fleetd(command, "-c", str(path))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and key in out.stderr and problem in out.stderr
    assert not os.path.exists(tmp_path / "state" / "fleetd.pid")


@pytest.mark.parametrize("command", ["check", "start"])
@pytest.mark.parametrize("bind", ["ipc://", "ipc://folder", "ipc://tasks.py"])
def test_an_ipc_bind_that_names_no_socket_file_is_refused_before_any_folder_is_touched(
    tmp_path: Path, command: str, bind: str
) -> None:
    """`ipc://` resolved to the config's folder, and start made that folder's parent 0700
    (/etc for /etc/fleetd/config.toml) before it found no socket there."""
    folder = tmp_path / "conf"
    (folder / "folder").mkdir(parents=True)
    path = write(folder, GOOD + f'\n[control]\nbind = ["{bind}"]\n')
    tmp_path.chmod(0o755)
    folder.chmod(0o755)
    out = fleetd(command, "-c", str(path))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "control" in out.stderr and "socket" in out.stderr, out.stderr
    assert [p.stat().st_mode & 0o777 for p in (tmp_path, folder)] == [0o755, 0o755]


UNREADABLE = [
    (GOOD.encode().replace(b'"h1"', b'"h\xe91"'), "not UTF-8 text"),  # Latin-1, say
    (GOOD.encode() + b"#" * (2 << 20), "over 1 MiB: not a config file"),
    (b"a = " + b"[" * 200_000, "nested too deep"),
]


@pytest.mark.parametrize(("data", "problem"), UNREADABLE)
def test_a_config_that_is_no_toml_text_exits_2_with_one_line(
    tmp_path: Path, data: bytes, problem: str
) -> None:
    """Bytes that are no UTF-8, a file far too big to be a config, nesting that the parser
    cannot follow: each ended `fleetd check` and `start` in a traceback."""
    path = tmp_path / "fleet.toml"
    path.write_bytes(data)
    for command in ("check", "start"):
        out = fleetd(command, "-c", str(path))
        assert out.returncode == 2
        assert problem in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_a_config_path_that_never_ends_is_read_no_further_than_a_config_could_be(
    tmp_path: Path,
) -> None:
    """`-c /dev/zero` (a slip of the shell): read on, it took every byte of memory."""
    out = fleetd("check", "-c", "/dev/zero")
    assert (out.returncode, out.stderr) == (
        2,
        "fleetd: /dev/zero: -: not a regular file (a FIFO, a device, a folder)\n",
    )
    big = tmp_path / "log.txt"  # a log given by mistake
    big.write_bytes(b"# \n" * (1 << 19))
    out = fleetd("check", "-c", str(big))
    assert (out.returncode, out.stderr) == (2, f"fleetd: {big}: -: over 1 MiB: not a config file\n")


def test_check_accepts_the_example_config() -> None:
    root = Path(__file__).resolve().parent.parent
    out = fleetd("check", "-c", str(root / "config" / "example.toml"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("text", "per_second"), [("200/m", 200 / 60), ("5/s", 5), ("5", 5), ("36/h", 0.01), ("0", 0)]
)
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "5/d", "-1/s", ""])
def test_parse_rate_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("١/s", "not N"),  # Arabic-Indic and full-width digits: float() reads them
        ("１/s", "not N"),
        ("0." + "0" * 400 + "1/s", "too small"),  # 0 to a float: the limit was cleared
        ("1e-400/s", "not N"),
        ("inf", "not N"),
        ("nan/s", "not N"),
        ("9" * 400 + "/s", "too large"),
    ],
)
def test_parse_rate_refuses_what_is_no_rate_or_would_clear_the_limit(
    text: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        parse_rate(text)
    assert len(str(err.value)) < 120


@pytest.mark.parametrize("text", ["0", "0/s", "0.0", "0.000/m"])
def test_parse_rate_takes_any_written_zero_as_no_limit(text: str) -> None:
    assert parse_rate(text) == 0


@pytest.mark.parametrize(
    ("text", "size"), [("512MB", 512 * 2**20), ("2GB", 2 * 2**30), ("0", 0), ("100kb", 102400)]
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("node", ["a b", "a@b", "../../etc"])
def test_a_node_given_on_the_command_line_is_held_to_fleet_nodes_rule(
    tmp_path: Path, node: str
) -> None:
    """`fleetd start --node "a b"` started a fleet whose nodes fleetctl cannot address (an @
    in it splits wrongly) and whose limits file path takes the name as it is."""
    with pytest.raises(ConfigError) as err:
        load(str(write(tmp_path, GOOD)), node=node)
    assert err.value.key == "--node" and repr(node) in err.value.problem
    out = fleetd("start", "-c", str(write(tmp_path, GOOD)), "--node", node)
    assert (out.returncode, out.stderr) == (2, f"fleetd: {err.value}\n")
