"""`strata dashboard` against a live fleet, in a real browser (Debian's headless Chromium driven
by Playwright): the ring shows 3 aggregators, the chart has a point for every closed round,
and clicking a semi-global model reaches a device update in the lineage graph.

The fleet is `strata demo`'s own daemons (coordinator, 3 aggregators, 6 agents, a relay with
3 devices) as real processes, run until every aggregator has closed 2 rounds; the dashboard
is the real `strata dashboard` process. Set STRATA_SCREENSHOTS=DIR to keep the README's
screenshots there (they always go to the test's directory too).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.codec import summarize
from strata.cmd_history import read_history
from tests.dashboard_fleet import LiveFleet, live_fleet
from tests.dashboard_serving import first_sse_event, get, get_json
from tests.procs import ProcessFactory, free_port, wait_port

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "a-browser-operator-token-0123456789"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    with live_fleet(tmp_path_factory.mktemp("fleet")) as live:
        yield live


@pytest.fixture(scope="module")
def dashboard(fleet: LiveFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs = ProcessFactory(tmp_path_factory.mktemp("dashboard"))
    port = free_port()
    state_dirs = [arg for d in fleet.state_dirs.values() for arg in ("--state-dir", str(d))]
    stores = ["--store", fleet.store, "--store", fleet.relay_store]
    try:
        process = procs.strata(
            "dashboard", "--coordinator", fleet.coordinator, "--listen", f"127.0.0.1:{port}", *state_dirs, *stores,
            name="dashboard", home=fleet.home,
        )
        process.wait_for_event("dashboard_started", timeout=30)
        wait_port("127.0.0.1", port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def guarded_dashboard(fleet: LiveFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second dashboard on the same fleet, behind an operator token."""
    workdir = tmp_path_factory.mktemp("guarded")
    (workdir / "token").write_text(TOKEN + "\n")
    procs = ProcessFactory(workdir)
    port = free_port()
    try:
        process = procs.strata(
            "dashboard", "--coordinator", fleet.coordinator, "--listen", f"127.0.0.1:{port}",
            "--token-file", str(workdir / "token"), name="guarded", home=fleet.home,
        )
        process.wait_for_event("dashboard_started", timeout=30)
        wait_port("127.0.0.1", port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, dashboard: str) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(20_000)
    yield page
    context.close()
    assert not errors, errors


def _screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get("STRATA_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)


def _closed_rounds(fleet: LiveFleet) -> dict[str, set[int]]:
    """Each aggregator's closed rounds, from its own journal (not through the dashboard)."""
    return {agg: {r["round"] for r in read_history(d) if r["closed"]} for agg, d in fleet.state_dirs.items()}


# ---------------------------------------------------------------- in the browser


def test_the_ring_shows_three_aggregators(page: Any, dashboard: str, tmp_path: Path) -> None:
    page.goto(dashboard + "/#/fleet")
    page.wait_for_function("document.querySelectorAll('#ring g.aggregator').length === 3")
    assert sorted(page.eval_on_selector_all("#ring g.aggregator", "gs => gs.map(g => g.dataset.id)")) == ["agg-a", "agg-b", "agg-c"]
    page.wait_for_selector("#live.on")  # the event stream delivered a snapshot
    page.wait_for_selector("#agents tbody tr")
    _screenshot(page, tmp_path, "dashboard-fleet.png")
    # the agents table filters as you type
    everyone = page.locator("#agents tbody tr").count()
    page.fill("#agent-filter", "agg-b")
    page.wait_for_function(f"document.querySelectorAll('#agents tbody tr').length < {everyone}")
    homes = page.eval_on_selector_all("#agents tbody tr td:nth-child(2)", "tds => tds.map(td => td.textContent)")
    assert homes and set(homes) == {"agg-b"}


def test_the_chart_has_a_point_for_every_closed_round(page: Any, dashboard: str, fleet: LiveFleet, tmp_path: Path) -> None:
    closed = _closed_rounds(fleet)
    assert all(len(rounds) >= 2 for rounds in closed.values()), closed
    page.goto(dashboard + "/#/learning")
    page.wait_for_function("window.dashboard.chartSeries && window.dashboard.chartSeries.length > 0")

    def missing() -> list[tuple[str, str, int]]:
        series = page.evaluate("window.dashboard.chartSeries")
        plotted = {
            (s["aggregator"], s["kind"]): set(s["rounds"]) for s in series if (s["metric"], s["source"]) == ("accuracy", "metrics")
        }
        return [
            (aggregator, kind, r)
            for aggregator, rounds in closed.items()
            for kind in ("cluster", "semi-global")
            for r in rounds
            if r not in plotted.get((aggregator, kind), set())
        ]

    # a round closes in the journal a moment before its models reach the coordinator's index;
    # the page follows the fleet live, so it catches up without a reload (bounded)
    give_up = time.monotonic() + 30
    while missing() and time.monotonic() < give_up:
        page.wait_for_timeout(500)
    assert not missing(), missing()
    series = page.evaluate("window.dashboard.chartSeries")
    # uPlot drew what it was given: one x per round, one y series per (aggregator, kind, metric)
    assert page.evaluate("window.dashboard.chart.data.length") == len(series) + 1
    _screenshot(page, tmp_path, "dashboard-learning.png")
    # held-out: what the agents measured on a model once a later round started from it
    page.select_option("#chart-source", "evaluated")
    page.wait_for_function("window.dashboard.chartSeries.every(s => s.source === 'evaluated')")
    held_out = page.evaluate("window.dashboard.chartSeries")
    assert any(s["kind"] == "semi-global" and s["rounds"] for s in held_out), held_out


def test_clicking_a_semi_global_model_reaches_a_device_update(page: Any, dashboard: str, tmp_path: Path) -> None:
    page.goto(dashboard + "/#/models")
    page.select_option("#model-search select[name=kind]", "semi-global")
    page.click("#model-search button")
    page.wait_for_function("[...document.querySelectorAll('#models tbody tr')].every(r => r.dataset.kind === 'semi-global')")
    page.click("#models tbody tr >> nth=0")
    page.wait_for_selector("#lineage g.node.root[data-kind='semi-global']")
    page.wait_for_selector("#model-facts >> text=valid")
    # the graph goes semi-global -> cluster -> device update
    page.click("#lineage g.node[data-kind='cluster'] >> nth=0")
    page.wait_for_selector("#lineage g.node.root[data-kind='cluster']")
    _screenshot(page, tmp_path, "dashboard-lineage.png")
    device = page.locator("#lineage g.node[data-kind='local'], #lineage g.node[data-kind='relay']").first
    cid = device.get_attribute("data-cid")
    device.click()
    page.wait_for_selector(f"#lineage g.node.root[data-cid='{cid}']")
    assert page.inner_text("#model-cid") == cid
    assert "device update: not served" in page.inner_text("#model-facts")


def test_a_token_once_in_the_url_lets_the_browser_in(browser: Any, guarded_dashboard: str) -> None:
    context = browser.new_context()
    page = context.new_page()
    try:
        assert page.goto(guarded_dashboard + "/").status == 401
        page.goto(f"{guarded_dashboard}/?token={TOKEN}")
        assert page.url == guarded_dashboard + "/"  # the token left the address bar for a cookie
        # the page's fetches and its event stream carry the cookie
        page.wait_for_function("document.querySelectorAll('#ring g.aggregator').length === 3", timeout=20_000)
        page.wait_for_selector("#live.on", timeout=20_000)
    finally:
        context.close()


# ---------------------------------------------------------------- the API on the live fleet


def test_the_api_reads_the_live_fleet(dashboard: str, fleet: LiveFleet) -> None:
    closed = _closed_rounds(fleet)

    def unreported() -> list[tuple[str, int]]:
        status, rounds = get_json(f"{dashboard}/api/rounds")
        assert status == 200 and sorted(rounds["journals"]) == ["agg-a", "agg-b", "agg-c"]
        rows = {(r["aggregator"], r["round"]): r for rs in rounds["aggregators"].values() for r in rs}
        return [
            (a, r) for a, rs in closed.items() for r in rs
            if not (rows.get((a, r)) and rows[a, r]["cluster"] and rows[a, r]["aggregation_s"] is not None)
        ]

    give_up = time.monotonic() + 30  # the index follows the journals by a moment
    while unreported() and time.monotonic() < give_up:
        time.sleep(0.5)
    assert not unreported(), unreported()
    _, rounds = get_json(f"{dashboard}/api/rounds")

    semi = rounds["aggregators"]["agg-a"][0]["semi_global"]["cid"]
    status, headers, weights = get(f"{dashboard}/api/models/{semi}/weights")
    assert status == 200 and summarize(weights)  # real safetensors bytes
    status, lineage = get_json(f"{dashboard}/api/lineage/{semi}")
    device_update = next(n for n in lineage["nodes"] if n["kind"] == "local")
    status, refusal = get_json(f"{dashboard}/api/models/{device_update['cid']}/weights")
    assert (status, refusal["error"]["reason"]) == (403, "device_update")

    name, snapshot = first_sse_event(f"{dashboard}/api/events")
    assert name == "snapshot" and len(snapshot["ring"]["aggregators"]) == 3
