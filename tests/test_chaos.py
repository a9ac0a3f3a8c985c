"""The short `make chaos`: hundreds of tasks, seconds not minutes, the same contract."""

from __future__ import annotations

import json

import pytest

from tests import chaos


@pytest.mark.parametrize("broker", ["sqlite", "redis"])
def test_short_chaos_loses_nothing_and_duplicates_only_interrupted_tasks(
    capsys: pytest.CaptureFixture[str], broker: str
) -> None:
    broker_restarts = 1 if broker == "redis" else 0
    code = chaos.main(
        [
            "--broker",
            broker,
            "--tasks",
            "800",
            "--duration",
            "20",
            "--child-kills",
            "8",
            "--worker-kills",
            "2",
            "--hups",
            "2",
            "--restarts",
            "1",
            "--usr1-bursts",
            "3",
            "--quits",
            "1",
            "--resizes",
            "1",
            "--stalls",
            "1",
            "--broker-restarts",
            str(broker_restarts),
            "--drain-timeout",
            "30",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert code == chaos.EXIT_OK, out.out + out.err
    figures = json.loads(out.out.splitlines()[-1])
    assert figures["submitted"] == figures["completed"] == 800 and figures["lost"] == 0
    assert figures["duplicated"] <= figures["running_in_killed"]
    assert (
        figures["child_kills"],
        figures["worker_kills"],
        figures["hups"],
        figures["restarts"],
    ) == (8, 2, 2, 1)
    assert figures["usr1s"] == 3
    assert (figures["quits"], figures["resizes"], figures["stalls"]) == (1, 1, 1)
    assert figures["broker_restarts"] == broker_restarts
    assert figures["poisons"] > 0 and figures["poisons_dead_lettered"] == figures["poisons"]
    assert figures["left_behind"] == figures["escapees_left"] == 0
    assert figures["escapees"] > 0
