"""The MLflow UI as people see it, in a real headless Chromium: a 3-trial sweep and two train runs in a
temporary store, served by `mlflow server` on loopback, opened at the URLs regsweep prints.

Chromium comes from Debian (`apt-get install -y chromium`), the driver is Playwright's Python package
launched on that binary (Playwright's own browser download is never used). Without either, the module is
skipped, saying which is missing. Pages are waited for by `load` plus selectors, never network idle: the UI
keeps polling.

`REGSWEEP_SCREENSHOTS=docs/images python -m pytest -m browser` also writes the README's screenshots there,
from slightly larger runs so that the curves have several points.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from regsweep.cli import cli
from regsweep.experiment import viewing_hint

from .conftest import REPO
from .servers import apt_install, free_port

CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> bool:
    """Debian's Chromium, installed from Debian's packages if this machine lacks it (as the PostgreSQL test
    does its server); False where that is not possible (no apt, no root, no registry)."""
    return apt_install("chromium", Path(CHROMIUM).exists)


# Skipped as a whole, before any run is made, where there is no browser to drive.
pytest.importorskip("playwright", reason="Playwright's Python package is missing (pip install -e '.[test]')")
pytestmark = [pytest.mark.browser,
              pytest.mark.xdist_group("browser"),  # one worker makes the module's runs and server, once
              pytest.mark.skipif(not ensure_chromium(),
                                 reason=f"no Chromium at {CHROMIUM} and it could not be installed "
                                        "(Debian: apt-get install -y chromium)")]
DOCS_DIR = os.environ.get("REGSWEEP_SCREENSHOTS")
# Tiny runs for the test (32 steps: enough for the runs to differ, so that the sort order is checkable);
# for the README's pictures, enough images and epochs to draw curves.
SIZE = (["--max-train-samples", "4096", "--max-eval-samples", "1024", "--epochs", "3"] if DOCS_DIR else
        ["--max-train-samples", "512", "--max-eval-samples", "256", "--epochs", "1"])
COMMON = [*SIZE, "--batch-size", "16", "--compile", "false"]
UI_DEFAULT = "http://127.0.0.1:5000"  # where the printed hint points: `mlflow ui`'s default address


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables before a second process opens the file
    return root, uri


@pytest.fixture(scope="module")
def server_process(store):
    """`mlflow server` on the store, on a free loopback port; started first, it boots while the runs train."""
    root, uri = store
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", uri, "--artifacts-destination", str(root / "served-artifacts")],
        cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def logged(store, server_process) -> dict:
    """A 3-trial `regsweep optimize` and two `regsweep train` runs in the store, with what the commands
    printed. (It asks for the server process only to have it booting meanwhile.)"""
    root, uri = store
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow puts a local store's artifacts under the working directory
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            mp.delenv(name, raising=False)
        mlflow.set_tracking_uri(uri)
        try:
            sweep = runner.invoke(cli, ["optimize", *COMMON, "--trials", "3", "--storage",
                                        f"sqlite:///{root / 'optuna.db'}", "--pruner", "none"])
            assert sweep.exit_code == 0, sweep.output
            # Figures only where a test looks at them (the trials): drawing them is most of a tiny run.
            trains = [runner.invoke(cli, ["train", *COMMON, "--l1", l1, "--l2", l2, "--log-model", "false",
                                          "--log-images", "false", "--experiment-name", "regsweep", "--quiet"])
                      for l1, l2 in (("0", "0"), ("0.0005", "0"))]
            for result in trains:
                assert result.exit_code == 0, result.output
        finally:
            mlflow.set_tracking_uri(None)
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # set_experiment exports it behind monkeypatch's back
    experiment = MlflowClient(uri).get_experiment_by_name("regsweep")
    runs = MlflowClient(uri).search_runs([experiment.experiment_id])
    return {"uri": uri, "experiment_id": experiment.experiment_id,
            "sweep_hint": sweep.output.strip().splitlines()[-2:],
            "trials": {r.info.run_name[:9]: r for r in runs if "optuna.trial_number" in r.data.tags},
            "runs": runs}


@pytest.fixture(scope="module")
def server(server_process, logged, store) -> str:
    """The server, up, serving the very store that the printed `mlflow ui` command names."""
    proc, url = server_process
    command = shlex.split(logged["sweep_hint"][0].split("#")[0])
    assert command == ["mlflow", "ui", "--backend-store-uri", logged["uri"]]
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start: " + (store[0] / "server.log").read_text()[-2000:])
            time.sleep(0.5)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    # MLflow opens its assistant panel on a browser's first visit; a returning browser keeps it closed, which
    # leaves the width to the runs.
    context.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def shoot(page, shots: Path, name: str, for_readme: bool = False) -> None:
    page.screenshot(path=shots / name)
    if for_readme and DOCS_DIR:
        folder = Path(DOCS_DIR) if Path(DOCS_DIR).is_absolute() else REPO / DOCS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=folder / name)


def served(url: str, server: str) -> str:
    """A printed URL, pointed at the test's server instead of `mlflow ui`'s default port."""
    assert url.startswith(UI_DEFAULT + "/#/"), url
    return server + url.removeprefix(UI_DEFAULT)


def open_page(page, url: str) -> None:
    page.goto(url, wait_until="load")


def row(page, text: str):
    return page.locator('[role="row"]', has_text=text)


def test_the_experiment_opens_on_its_runs_table(page, logged, server, shots):
    open_page(page, f"{server}/#/experiments/{logged['experiment_id']}?workflowType=machine_learning")
    page.wait_for_url(re.compile(rf"#/experiments/{logged['experiment_id']}/runs\b"))
    row(page, "study regsweep").wait_for()
    assert page.locator("input[value=TABLE]").is_checked()
    tags = MlflowClient(logged["uri"]).get_experiment(logged["experiment_id"]).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # set by optimize and by train
    shoot(page, shots, "experiment.png")


def test_the_study_expands_to_its_trials(page, logged, server, shots):
    open_page(page, f"{server}/#/experiments/{logged['experiment_id']}/runs?workflowType=machine_learning")
    study = row(page, "study regsweep")
    study.wait_for()
    assert row(page, "trial 00").count() == 0  # nested under the study, collapsed
    assert row(page, "cnn l1=5e-4 l2=0").count() == 1
    study.locator('[col-id="attributes.`Run Name`"] button').click()
    for number in ("trial 000", "trial 001", "trial 002"):
        row(page, number).wait_for()
    shoot(page, shots, "runs-table.png", for_readme=True)


def shown_best_val_acc(page) -> list[float]:
    """best_val_acc of the rows that have one, top to bottom as shown (the grid positions rows by index)."""
    cells = {}
    for r in page.locator('[role="row"][row-index]').all():
        cell = r.locator('[col-id="metrics.`best_val_acc`"]')
        if cell.count() and cell.inner_text().strip() not in ("", "-"):
            cells[int(r.get_attribute("row-index"))] = float(cell.inner_text())
    return [cells[i] for i in sorted(cells)]


def test_the_printed_url_opens_the_runs_sorted_by_best_val_acc_with_l1_and_l2(page, logged, server, shots):
    command, url = logged["sweep_hint"]
    assert command.startswith("mlflow ui --backend-store-uri sqlite:///") and "viewStateShareKey=" in url
    open_page(page, served(url, server))
    for column in ("params.`l1`", "params.`l2`", "metrics.`best_val_acc`", "metrics.`test_acc_at_best_val`"):
        page.locator(f'.ag-header-cell[col-id="{column}"]').wait_for()
    page.get_by_role("button", name="Sort: best_val_acc").wait_for()
    row(page, "trial 002").wait_for()
    stored = sorted((r.data.metrics["best_val_acc"] for r in logged["runs"] if "best_val_acc" in r.data.metrics),
                    reverse=True)
    assert len(stored) == 5 and shown_best_val_acc(page) == pytest.approx(stored, abs=1e-4)  # best first
    shoot(page, shots, "compare-view.png", for_readme=True)


def test_the_chart_view_of_two_trials_starts_with_val_acc(page, logged, server, shots):
    open_page(page, served(logged["sweep_hint"][1], server))
    row(page, "trial 000").wait_for()
    page.locator("label", has=page.locator("input[value=CHART]")).click()
    page.get_by_role("button", name="Toggle visibility of runs").click()
    page.get_by_role("menuitemradio", name="Hide all runs").click()
    chosen = [logged["trials"]["trial 000"].info.run_name, logged["trials"]["trial 001"].info.run_name]
    for name in chosen:
        row(page, name).locator("label:has(input.is-visibility-toggle-checkbox)").click()
    legend = page.get_by_text(re.compile(r"\(val/acc\)$"))
    legend.nth(1).wait_for()
    assert sorted(legend.all_inner_texts()) == sorted(f"{name} (val/acc)" for name in chosen)
    # The saved view puts the accuracy and loss sections first, the penalties after them.
    val_acc = page.get_by_text("val/acc", exact=True).first.bounding_box()
    penalty = page.get_by_text("penalty/l1", exact=True).first
    assert penalty.count() == 0 or penalty.bounding_box()["y"] > val_acc["y"]
    shoot(page, shots, "chart-view.png", for_readme=True)


def png_width(path: str) -> int:
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", header[16:20])[0]


def test_a_trials_misclassified_digits_render(page, logged, server, shots):
    trial = logged["trials"]["trial 001"]
    open_page(page, served(logged["sweep_hint"][1], server))
    page.get_by_role("link", name=trial.info.run_name).click()
    page.wait_for_url(re.compile(rf"/runs/{trial.info.run_id}"))
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("misclassified.png", exact=True).click()
    image = page.locator('img[src^="blob:"]').first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    local = mlflow.artifacts.download_artifacts(run_id=trial.info.run_id, artifact_path="misclassified.png",
                                                dst_path=str(shots), tracking_uri=logged["uri"])
    assert image.evaluate("img => img.naturalWidth") == png_width(local)
    shoot(page, shots, "misclassified.png")


def test_for_a_tracking_server_the_hint_is_its_urls(logged, server):
    experiment_id, trial = logged["experiment_id"], logged["trials"]["trial 000"].info.run_id
    mlflow.set_tracking_uri(server)
    try:
        assert viewing_hint(experiment_id) == (f"{server}/#/experiments/{experiment_id}/runs"
                                               "?workflowType=machine_learning&viewStateShareKey=regsweep-compare")
        assert viewing_hint(experiment_id, trial) == (f"{server}/#/experiments/{experiment_id}/runs/{trial}"
                                                      "?workflowType=machine_learning")
    finally:
        mlflow.set_tracking_uri(None)
