"""The dashboard's pages in a real browser: Debian's chromium, headless, driven by Selenium
through Debian's chromedriver (never a browser downloaded at test time).

`python -m tests.test_dashboard_browser DIR` writes the README's screenshots into DIR
from a running fleet.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests import test_dashboard
from tests.fleet import Fleet, wait_for
from tests.test_dashboard import EVERY_SECOND, TOKEN, Dashboard, with_token

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1360,900",
)
start_dashboard = test_dashboard.start_dashboard  # the fixture, shared
pytestmark = pytest.mark.timeout(120)


def open_browser() -> object:
    """A headless chromium under Selenium; fails under CI (CI=true) when Debian's chromium
    or chromedriver is missing, skips the test elsewhere."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        why = (
            "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return start_chromium()


def start_chromium() -> object:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture
def browser() -> Iterator[object]:
    driver = open_browser()
    try:
        yield driver
    finally:
        driver.quit()  # type: ignore[attr-defined]


def find(driver: object, css: str, timeout: float = 10.0) -> object:
    """The first element `css` selects, once there is one."""
    from selenium.webdriver.common.by import By

    def found() -> object:
        elements = driver.find_elements(By.CSS_SELECTOR, css)  # type: ignore[attr-defined]
        return elements[0] if elements else None

    return wait_for(found, timeout, 0.05, f"{css} on the page")


def click(driver: object, css: str) -> None:
    """Click what `css` selects, found again if a live update redrew it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked() -> bool:
        try:
            find(driver, css).click()  # type: ignore[attr-defined]
        except StaleElementReferenceException:
            return False
        return True

    wait_for(clicked, 10, 0.05, f"a click on {css}")


def count(driver: object, css: str) -> int:
    from selenium.webdriver.common.by import By

    return len(driver.find_elements(By.CSS_SELECTOR, css))  # type: ignore[attr-defined]


def text_of(driver: object, css: str) -> str:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return str(find(driver, css).text)  # type: ignore[attr-defined]
    except StaleElementReferenceException:  # redrawn by a live update meanwhile
        return ""


def test_the_fleet_page_shows_the_nodes_and_follows_the_pool_live(
    make_fleet, start_dashboard, browser, tmp_path
) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host")).start()
    dashboard = start_dashboard(fleet)
    browser.get(dashboard.url)  # type: ignore[attr-defined]
    assert "w@h1" in text_of(browser, 'tr[data-node="w@h1"]')
    wait_for(lambda: count(browser, "tr.child") == 2, message="two children on the page")
    assert "RUNNING" in text_of(browser, 'tr[data-node="w@h1"]')
    assert text_of(browser, "#live") == "live"
    dashboard.post("/api/nodes/w@h1/pool", {"action": "grow"}, TOKEN)
    wait_for(lambda: count(browser, "tr.child") == 3, message="the third child, pushed live")


# Imported by every worker of the fleet: the one named "bad" dies as it boots, until its
# arbiter leaves it FATAL.
# bad@ boots, then dies at every start once the test makes the marker: FATAL (a worker
# that cannot boot at `fleetd start` ends the whole start instead).
DIES_AS_BAD = """
import os, sys
told = os.path.exists(os.path.join(os.path.dirname(__file__), "die"))
if sys.argv[-1].startswith("bad@") and told:
    raise SystemExit(1)
"""


def test_a_fatal_node_stands_out_on_the_fleet_page(make_fleet, start_dashboard, browser) -> None:
    fleet = make_fleet(
        workers=[{"name": "w"}, {"name": "bad"}], fleet={"imports": ["tasks", "dies_as_bad"]}
    )
    (fleet.folder / "dies_as_bad.py").write_text(DIES_AS_BAD)
    fleet.start()
    (fleet.folder / "die").touch()
    [bad] = [p for p in fleet.worker_pids() if "bad@h1" in " ".join(psutil.Process(p).cmdline())]
    os.kill(bad, signal.SIGKILL)
    dashboard = start_dashboard(fleet)
    browser.get(dashboard.url)  # type: ignore[attr-defined]
    wait_for(  # FATAL after FATAL_AFTER failed starts with their backoff, then a live update
        lambda: "FATAL" in text_of(browser, 'tr.node[data-node="bad@h1"]'),
        60,
        message="bad@h1 FATAL",
    )
    assert count(browser, 'tr.node.bad[data-node="bad@h1"]') == 1, "not in red"
    assert "RUNNING" in text_of(browser, 'tr.node[data-node="w@h1"]')
    assert count(browser, 'tr.node.bad[data-node="w@h1"]') == 0


def test_a_task_is_followed_from_the_tasks_list_to_its_page(
    make_fleet, start_dashboard, browser
) -> None:
    fleet = make_fleet().start()
    handle = fleet.client.submit("tasks.add", 2, 3)
    handle.get(10)
    dashboard = start_dashboard(fleet)
    browser.get(dashboard.url + "/#/tasks")  # type: ignore[attr-defined]
    click(browser, f'tr[data-task="{handle.id}"] a')
    wait_for(lambda: handle.id in text_of(browser, "#task h2"), message="the task's page")
    assert "SUCCESS" in text_of(browser, '[data-fact="state"]')
    assert text_of(browser, "#result") == "5"
    assert '"args": [\n    2,\n    3\n  ]' in text_of(browser, "#args").replace("\r", "")


def test_revoke_in_the_page_asks_for_the_token_once(
    make_fleet, start_dashboard, browser, tmp_path
) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host")).start()
    gate = tmp_path / "gate"
    first, second = (fleet.client.submit("tasks.hold", str(gate)) for _ in range(2))
    wait_for(lambda: first.state == second.state == "STARTED", message="both tasks to start")
    dashboard = start_dashboard(fleet)
    browser.get(f"{dashboard.url}/#/task/{first.id}")  # type: ignore[attr-defined]
    click(browser, "#terminate:enabled")
    find(browser, "#token-dialog[open] #token-input").send_keys("wrong")  # type: ignore[attr-defined]
    click(browser, "#token-ok")
    wait_for(lambda: "refused" in text_of(browser, "#flash"), message="the wrong token refused")
    find(browser, "#token-dialog[open] #token-input").send_keys(TOKEN)  # type: ignore[attr-defined]
    click(browser, "#token-ok")
    wait_for(lambda: first.state == "REVOKED", message="the first task revoked")
    wait_for(lambda: "REVOKED" in text_of(browser, '[data-fact="state"]'), message="its page")
    browser.get(f"{dashboard.url}/#/task/{second.id}")  # type: ignore[attr-defined]
    click(browser, "#terminate:enabled")
    wait_for(lambda: second.state == "REVOKED", message="the second task revoked")
    assert count(browser, "#token-dialog[open]") == 0  # not asked again


def test_a_read_only_dashboard_says_so_and_revokes_nothing(
    make_fleet, start_dashboard, browser, tmp_path
) -> None:
    fleet = make_fleet().start()
    gate = tmp_path / "gate"
    handle = fleet.client.submit("tasks.hold", str(gate))
    wait_for(lambda: handle.state == "STARTED", message="the task to start")
    dashboard = start_dashboard(fleet)
    browser.get(f"{dashboard.url}/#/task/{handle.id}")  # type: ignore[attr-defined]
    # The element is there before the page has asked the dashboard what it may do.
    wait_for(lambda: text_of(browser, "#mode") == "read-only", message="the read-only mode")
    click(browser, "#revoke:enabled")
    wait_for(lambda: "read-only" in text_of(browser, "#flash"), message="the read-only notice")
    assert count(browser, "#token-dialog[open]") == 0
    gate.touch()
    assert handle.get(10) > 0  # it ran to its end


def test_a_schedule_is_paused_and_resumed_from_its_page(
    make_fleet, start_dashboard, browser, tmp_path
) -> None:
    fleet = make_fleet(extra=with_token(tmp_path / "host") + EVERY_SECOND).start()
    dashboard = start_dashboard(fleet)
    browser.get(f"{dashboard.url}/#/schedules")  # type: ignore[attr-defined]
    wait_for(lambda: "w@h1" in text_of(browser, "#leader"), 15, message="the leader shown")
    wait_for(
        lambda: "schedule:tick:" in text_of(browser, 'tr[data-schedule="tick"]'),
        15,
        message="the tick's last task on the page",
    )
    click(browser, '[data-steer="pause tick"]')
    find(browser, "#token-dialog[open] #token-input").send_keys(TOKEN)  # type: ignore[attr-defined]
    click(browser, "#token-ok")
    wait_for(
        lambda: "paused" in text_of(browser, 'tr.warn[data-schedule="tick"]'), message="paused"
    )
    assert json.loads(fleet.ctl("--json", "schedule", "list").stdout)["schedules"][0]["paused"]
    click(browser, '[data-steer="resume tick"]')
    wait_for(
        lambda: (
            count(browser, 'tr.warn[data-schedule="tick"]') == 0
            and count(browser, '[data-steer="pause tick"]') == 1
        ),
        message="resumed",
    )
    assert count(browser, "#token-dialog[open]") == 0  # the token was asked once


def test_the_queues_page_charts_the_waits(make_fleet, start_dashboard, browser) -> None:
    fleet = make_fleet().start()
    dashboard = start_dashboard(fleet)
    browser.get(f"{dashboard.url}/#/queues")  # type: ignore[attr-defined]
    find(browser, "svg.chart-wait_p50")
    find(browser, "svg.chart-wait_p99")
    fleet.client.submit("tasks.add", 1, 2).get(10)
    wait_for(
        lambda: text_of(browser, "figure:has(svg.chart-wait_p99) .now") not in ("", "–"),
        15,
        message="the wait of the task, charted",
    )


def screenshots(folder: Path) -> None:
    """The README's screenshots: a fleet with some work done, a failure and a dead letter."""
    import time

    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(
            Path(tmp) / "host",
            workers=[{"name": "default"}, {"name": "images", "queues": ["images"]}],
            extra=with_token(Path(tmp) / "host"),
        )
        fleet.start()
        dashboard = None
        driver = open_browser()
        try:
            dashboard = Dashboard(fleet)
            for _ in range(20):  # a few samples of throughput for the charts
                fleet.client.submit_many([("tasks.add", (i, 1), {}) for i in range(40)])
                fleet.client.submit_many([("tasks.fail", ("bad input",), {}) for _ in range(3)])
                time.sleep(0.5)
            fleet.client.submit("tasks.nobody_knows", 1)
            fleet.client.submit("tasks.hold", str(Path(tmp) / "gate"), queue="images")
            fleet.client.submit_many([("tasks.noop", (), {})] * 12, queue="reports")
            failed = fleet.client.submit("tasks.fail", "the photo is corrupt")
            fleet.wait_all_final([failed.id])
            time.sleep(4)
            for name, path in [
                ("fleet", "/#/fleet"),
                ("queues", "/#/queues"),
                ("tasks", "/#/tasks"),
                ("task", f"/#/task/{failed.id}"),
                ("dead", "/#/dead"),
            ]:
                driver.get(dashboard.url + path)  # type: ignore[attr-defined]
                time.sleep(1.5)
                driver.save_screenshot(str(folder / f"dashboard-{name}.png"))  # type: ignore[attr-defined]
        finally:
            driver.quit()  # type: ignore[attr-defined]
            if dashboard is not None:
                dashboard.stop()
            (Path(tmp) / "gate").touch()
            fleet.stop()


if __name__ == "__main__":
    screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
