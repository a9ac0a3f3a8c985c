"""Where the Redis server's time goes inside one worker turn: `python -m bench.redis_phases
[--turns N]`.

Runs the turn script (redis_turn.lua with its prelude and epilogue) as a worker's steady
state does: each turn acks and stores the results of the tasks the turn before reserved,
and reserves N more (1 and 4 here; a worker at prefetch 3 with 2 children takes about 4 a
turn). It runs an instrumented copy of the script, with Redis's clock (TIME) read between
its phases, on a private redis-server, and prints the median microseconds of each phase per
turn:

    definitions   the script's text run from the top: every `local function` made again,
                  the arguments decoded from JSON (Redis keeps no state between two EVALs),
                  and the call key read (is this call a retry of one that ran?)
    finish        the outcomes: each task's record closed, its result stored, its waiter woken
    drop          the ended tasks' stream entries acked and deleted (XACK, XDEL)
    reserve       the new tasks read (XREADGROUP) and their records marked held
    reply         the reply encoded, kept under the call key, the wake-ups published

Above them: the whole turn as INFO commandstats times a run of the plain script, and the
time of the Redis commands it ran; what is left is Lua's own. The TIME calls add some
0.2 us to each phase.

`--instructions` runs the server under valgrind's callgrind instead and prints the machine
instructions it executed per turn (the plain script, from the command's arrival to its
reply): a count that does not move with a shared machine's load, for comparing two versions
of the script where times differ by less than their noise. Open the profile it names with
callgrind_annotate to see which functions they went to.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis

from bench.redis_server import RedisServer
from worker.brokers.base import SUCCESS, Envelope, Outcome
from worker.brokers.redis import (
    EPILOGUE,
    PRELUDE,
    WRITE_SCRIPTS,
    RedisBroker,
    encode_args,
    lua,
    outcome_args,
)

QUEUE = "bench"
PREFIX = f"bench-phases-{uuid.uuid4().hex[:12]}"
BODY = '{"args": [1, 2], "kwargs": {}}'
PHASES = ["definitions", "finish", "drop", "reserve", "reply"]
# Microseconds since the script's first second: small enough for cjson's 14 digits.
CLOCK = """local __marks, __second = {}, nil
local function __mark(name)
  local t = redis.call('TIME')
  __second = __second or tonumber(t[1])
  __marks[#__marks + 1] = {name, (tonumber(t[1]) - __second) * 1e6 + tonumber(t[2])}
end
__mark('start')
"""


def marked(text: str, anchor: str, before: str = "", after: str = "") -> str:
    """`text` with Lua put before and after its one `anchor`; SystemExit if the script
    changed so that the anchor is gone (this tool then needs its anchors moved)."""
    if text.count(anchor) != 1:
        raise SystemExit(f"bench: the turn script no longer holds {anchor!r} once")
    return text.replace(anchor, before + anchor + after)


def instrumented() -> str:
    """The turn script with a mark at the end of each phase; it returns the marks."""
    turn = marked(lua("turn"), "local function main()\n", after="  __mark('definitions')\n")
    turn = marked(turn, "  drop_spent()\n  if A.n > 0 then", before="  __mark('finish')\n")
    turn = marked(turn, "  if A.n > 0 then", before="  __mark('drop')\n")
    turn = marked(turn, "    local counter", before="    __mark('reserve')\n")
    epilogue = marked(EPILOGUE, "return reply", before="__mark('reply')\n")
    epilogue = epilogue.replace("return reply", "return cjson.encode(__marks)")
    return CLOCK + PRELUDE + turn + epilogue


def turns(client: redis.Redis, script: str, per_turn: int, count: int) -> list[dict[str, float]]:
    """`count` turns of `script`, each acking the tasks the one before reserved and reserving
    `per_turn` more; the phases' microseconds of each turn (when the script returns marks)."""
    sha = client.script_load(script)
    link = uuid.uuid4().hex
    outcomes: list[Outcome] = []
    timings = []
    for call in range(count):
        args = {
            "started": [],
            "node": "bench@host",
            "outcomes": [outcome_args(o) for o in outcomes],
            "retries": [],
            "ttl": "3600",
            "queues": [QUEUE],
            "n": per_turn,
            "owner": "bench-w1",
            "lease_ms": "60000",
        }
        reply = client.evalsha(sha, 0, PREFIX, link, call, repr(time.time()), encode_args(args))
        kept = client.get(f"{PREFIX}:call:{link}")
        rows = json.loads(kept.split(b" ", 1)[1])["rows"] or []
        outcomes = [
            Outcome(row[0], SUCCESS, result=3, node="bench@host", runtime=0.001) for row in rows
        ]
        if len(rows) < per_turn:
            raise SystemExit("bench: the queue ran dry; this is a bug of the tool")
        marks = json.loads(reply) if reply.startswith(b"[") else []
        timings.append(
            {name: t - marks[i][1] for i, (name, t) in enumerate(marks[1:])} if marks else {}
        )
    return timings


def command_usec(client: redis.Redis) -> dict[str, float]:
    """INFO commandstats: microseconds by command, the script commands left out."""
    stats = client.info("commandstats")
    skip = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_info", "cmdstat_config|resetstat")
    return {name[len("cmdstat_") :]: v["usec"] for name, v in stats.items() if name not in skip}


def fill(url: str, tasks: int) -> None:
    broker = RedisBroker(url, prefix=PREFIX)
    for start in range(0, tasks, 1000):
        ids = [uuid.uuid4().hex for _ in range(min(1000, tasks - start))]
        broker.enqueue([Envelope(i, QUEUE, "tasks.add", BODY) for i in ids])
    broker.close()


def control(args: list[str]) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True)


def instructions(count: int) -> None:
    """--instructions: the turns of each size under callgrind, its counters zeroed before
    them and dumped after (callgrind_control), the dump's instruction total per turn."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("bench: --instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="fleetd-phases-") as folder:
        out = Path(folder) / "callgrind.out"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        with RedisServer(Path(folder) / "redis", wrapper) as server:
            assert server.proc is not None
            fill(server.url, 2 * (count + 5) * 5 + 100)
            client = redis.Redis.from_url(server.url)
            script = WRITE_SCRIPTS["turn"].source
            pid = str(server.proc.pid)
            for per_turn in (1, 4):
                turns(client, script, per_turn, 5)  # the script loaded and run once
                control(["--zero", pid])
                turns(client, script, per_turn, count)
                control(["--dump", pid])
                # The one dump there: each is moved out once read.
                [profile] = out.parent.glob("callgrind.out.*")
                summary = re.search(r"^summary: (\d+)$", profile.read_text(), re.M)
                assert summary, profile
                total = int(summary[1])
                kept = Path(tempfile.gettempdir()) / f"fleetd-turn-{per_turn}.callgrind"
                shutil.move(profile, kept)
                print(
                    f"turn reserving {per_turn} and acking {per_turn}: {total / count:,.0f}"
                    f" instructions a turn, {total / count / per_turn:,.0f} a task"
                    f" (profile: {kept})"
                )
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_phases", description=__doc__)
    parser.add_argument("--turns", type=int, default=2000, help="turns of each size")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions under callgrind"
    )
    args = parser.parse_args()
    if args.instructions:
        return instructions(min(args.turns, 400))
    with tempfile.TemporaryDirectory(prefix="fleetd-phases-") as folder:
        with RedisServer(Path(folder)) as server:
            fill(server.url, 2 * args.turns * 5 + 100)
            client = redis.Redis.from_url(server.url)
            script = WRITE_SCRIPTS["turn"].source
            for per_turn in (1, 4):
                client.config_resetstat()
                turns(client, script, per_turn, args.turns)
                stats = client.info("commandstats")
                whole = stats["cmdstat_evalsha"]["usec"] / args.turns
                nested = sum(command_usec(client).values()) / args.turns
                phases = turns(client, instrumented(), per_turn, args.turns)
                print(
                    f"turn reserving {per_turn} and acking {per_turn}: {whole:.1f} us a turn,"
                    f" {whole / per_turn:.1f} us a task; its Redis commands {nested:.1f} us,"
                    f" Lua's own {whole - nested:.1f} us"
                )
                for name in PHASES:
                    usec = statistics.median(t[name] for t in phases)
                    print(f"  {name:<12}{usec:>7.1f} us")
            client.close()


if __name__ == "__main__":
    main()
