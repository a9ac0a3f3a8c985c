"""Submitting by name goes to the queue the task's @task declared, without the task's code."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from tests.fleet import Fleet

ROUTED = """
from fleetd import task

@task(queue="images")
def resize(photo_id):
    return photo_id
"""

SUBMIT = """
import json, sys
from fleetd import Client
c = Client.from_config(sys.argv[1])
explicit = c.submit("routed.resize", 2, queue="default")
print(json.dumps([c.submit("routed.resize", 1).id, explicit.id]))
"""


def test_submit_by_name_honours_the_tasks_queue_and_an_explicit_queue_wins(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet(
        fleet={"imports": ["tasks", "routed"]},
        workers=[{"name": "w", "queues": ["default"]}, {"name": "img", "queues": ["images"]}],
    )
    (fleet.folder / "routed.py").write_text(ROUTED)
    fleet.start()
    # A process that never imported `routed`, as an operator's script or fleetctl is.
    out = subprocess.run(
        [sys.executable, "-c", SUBMIT, str(fleet.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    routed, explicit = json.loads(out.stdout)
    infos = fleet.wait_all_final([routed, explicit], 15)
    assert [i["node"] for i in infos] == ["img@h1", "w@h1"]
    reply = json.loads(fleet.ctl("--json", "submit", "routed.resize", "3", "--wait", "10").stdout)
    assert reply["state"] == "SUCCESS" and reply["node"] == "img@h1"
