"""The dashboard over HTTP and in a real headless browser, and `hpo report`'s plots."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import env_without_storage, invoke, missing, need_module, small_spec

ROOT = Path(__file__).resolve().parents[1]


class Dashboard:
    """`hpo dashboard --port 0` in a subprocess; the port is read from its first line."""

    def __init__(self, storage: str, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hpo", "dashboard", "--storage", storage, "--port", "0", *args],
            stderr=subprocess.PIPE, text=True, env=env_without_storage(), cwd=cwd,
        )
        assert self.proc.stderr is not None
        self.banner = self.proc.stderr.readline()
        match = re.search(r"http://([\d.]+):(\d+)", self.banner)
        assert match, f"no address in {self.banner!r}"
        self.host, self.port = match.group(1), int(match.group(2))
        self.url = f"http://{self.host}:{self.port}"

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def close(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return self.banner + err


@pytest.fixture
def finished(write_spec, runner, storage_url) -> str:
    spec = small_spec(budget={"n_trials": 8, "epochs": 4}, sampler={"name": "random"},
                      pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1})
    assert invoke(runner, "run", write_spec(spec), "--storage", storage_url).exit_code == 0
    return storage_url


def test_dashboard_json_api_shows_trials_curves_and_attrs(finished, tmp_path) -> None:
    dash = Dashboard(finished, tmp_path)
    try:
        assert dash.host == "127.0.0.1"  # never exposed unless asked
        studies = dash.get("/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["small"]
        detail = dash.get(f"/api/studies/{studies[0]['study_id']}")
        study = optuna.load_study(study_name="small", storage=finished)
        assert len(detail["trials"]) == len(study.trials) == 8
        kept, best = set(), float("-inf")
        for t in sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete):
            if t.value >= best:
                kept.add(t.number)
                best = t.value
        by_number = {t["number"]: t for t in detail["trials"]}
        for t in study.trials:
            shown = by_number[t.number]
            assert shown["state"].upper() == t.state.name
            assert len(shown["intermediate_values"]) == len(t.intermediate_values)
            attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
            assert {"train_loss", "epoch_seconds", "device", "n_params"} <= set(attrs)
            if t.state == TrialState.PRUNED:
                assert "pruned by the median rule" in attrs["reason"]
            # Weights are kept exactly for the trials that were the best so far when they completed.
            names = [a["filename"] for a in shown["artifacts"]]
            assert names == (["model.pt"] if t.number in kept else [])  # hpo's loop prints nothing: no log
        assert "best_model.pt" in [a["filename"] for a in detail["artifacts"]]
        # An artifact is served from the store the study recorded.
        artifact = detail["artifacts"][0]
        with urllib.request.urlopen(f"{dash.url}/artifacts/{studies[0]['study_id']}/{artifact['artifact_id']}") as r:
            assert len(r.read()) > 1000
    finally:
        dash.close()


def test_dashboard_never_shows_the_password(pg_url, write_spec, runner, tmp_path) -> None:
    secret = "hunter2-secret"
    url = pg_url.replace("postgres@", f"postgres:{secret}@")  # trust auth ignores it; we must hide it
    assert invoke(runner, "run", write_spec(small_spec(budget={"n_trials": 2, "epochs": 1})),
                  "--storage", url).exit_code == 0
    dash = Dashboard(url, tmp_path)
    try:
        pages = [dash.text("/api/studies"), dash.text("/api/studies/1"), dash.text("/api/meta")]
    finally:
        log = dash.close()
    assert "postgres:***@" in log
    assert all(secret not in page for page in pages) and secret not in log


@pytest.mark.slow
def test_live_study_shows_up_and_reading_never_locks_sqlite(write_spec, tmp_path) -> None:
    """A dashboard polls a SQLite study that a run's two workers are writing (optuna-dashboard#545)."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    invoke_env = env_without_storage()
    from hpo.storage.backends import open_storage

    open_storage(url)  # the storage exists, but not the study, when the dashboard starts
    dash = Dashboard(url, tmp_path)
    # Trials of about a second each (20,000 rows), so the run outlasts several of the dashboard's
    # 2 s re-reads even with two workers.
    spec = small_spec(name="live", budget={"n_trials": 25, "epochs": 3}, pruner={"name": "none"},
                      data={"dataset": "synthetic", "n_samples": 20000, "n_features": 12, "n_classes": 3})
    run = subprocess.Popen([sys.executable, "-m", "hpo", "run", str(write_spec(spec)), "--storage", url, "--workers", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=invoke_env, cwd=tmp_path)
    seen_counts = []
    try:
        while run.poll() is None:
            studies = dash.get("/api/studies")["study_summaries"]
            if studies:
                detail = dash.get(f"/api/studies/{studies[0]['study_id']}")
                seen_counts.append(len(detail["trials"]))
        out, err = run.communicate(timeout=60)
        study_id = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        deadline = time.monotonic() + 30  # the dashboard re-reads trials every 2 s (its cache TTL)
        final = dash.get(f"/api/studies/{study_id}")
        while time.monotonic() < deadline and (
            len(final["trials"]) < 25 or {t["state"] for t in final["trials"]} != {"Complete"}
        ):
            final = dash.get(f"/api/studies/{study_id}")
    finally:
        dash.close()
    assert run.returncode == 0, err
    assert "locked" not in err
    assert len(set(seen_counts)) > 2, "the dashboard should have seen the study grow"
    states = {t["state"] for t in final["trials"]}
    assert len(final["trials"]) == 25 and states == {"Complete"}


def _chrome_driver():
    webdriver = need_module("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        missing("chromium and chromedriver are not installed: apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def test_browser_shows_trial_table_and_learning_curve(finished, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study = optuna.load_study(study_name="small", storage=finished)
    driver = _chrome_driver()
    dash = Dashboard(finished, tmp_path)
    try:
        study_id = dash.get("/api/studies")["study_summaries"][0]["study_id"]
        wait = WebDriverWait(driver, 60)
        # The study page's learning-curve chart: plotly draws one trace per trial.
        driver.get(f"{dash.url}/dashboard/studies/{study_id}")
        curves = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#graph-intermediate-values .scatterlayer .trace") or False
        )
        assert len(curves) == len(study.trials)
        assert "Intermediate values" in driver.find_element(By.TAG_NAME, "body").text
        time.sleep(1)  # let plotly finish drawing before the picture (no assertion depends on it)
        shot = tmp_path / "study.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        if os.environ.get("HPO_SAVE_SCREENSHOT"):
            shutil.copy(shot, ROOT / "docs" / "dashboard-study.png")
        # The trial table (this dashboard version lists trials with their state on /trials).
        driver.get(f"{dash.url}/dashboard/studies/{study_id}/trials")
        wait.until(lambda d: f"{len(study.trials)} Trials" in d.find_element(By.TAG_NAME, "body").text)
        text = driver.find_element(By.TAG_NAME, "body").text
        for t in study.trials:
            assert f"Trial {t.number}" in text
        assert "Pruned" in text and "Complete" in text
    finally:
        driver.quit()
        dash.close()


def test_hpo_summary_pages_say_what_hpo_best_says_and_draw_the_study(finished, runner, tmp_path) -> None:
    """/hpo/ lists the study; /hpo/studies/NAME shows its counts, its best trial as `hpo best`
    prints it, its history and curves (drawn in headless Chromium), its best and latest trials;
    a study that does not exist is one line and a 404."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study = optuna.load_study(study_name="small", storage=finished)
    best = study.best_trial
    dash = Dashboard(finished, tmp_path)
    try:
        assert "/hpo/" in dash.banner
        index = dash.text("/hpo/")
        assert "/hpo/studies/small" in index and f"<td>{len(study.trials)}</td>" in index
        page = dash.text("/hpo/studies/small")
        said = invoke(runner, "best", "small", "--storage", finished).output
        assert f"Best trial #{best.number}" in page and f"Best trial #{best.number}" in said
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert f"{len(complete)} complete" in page and f"({len(study.trials)} trials)" in page
        with pytest.raises(urllib.error.HTTPError) as missing_study:
            dash.text("/hpo/studies/nope")
        assert missing_study.value.code == 404
        assert "no study named 'nope'" in html.unescape(missing_study.value.read().decode())
        driver = _chrome_driver()
        try:
            driver.get(f"{dash.url}/hpo/studies/small")
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg[aria-label=curves] polyline"))
            assert len(driver.find_elements(By.CSS_SELECTOR, "svg[aria-label=history] circle")) >= len(complete) > 0
            assert len(driver.find_elements(By.CSS_SELECTOR, "svg[aria-label=curves] polyline")) == min(8, len(complete))
            rows = driver.find_elements(By.CSS_SELECTOR, "table tr")
            assert len(rows) == (1 + len(complete)) + (1 + len(study.trials))  # the best, the latest, with headers
            shot = tmp_path / "summary.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 20_000
        finally:
            driver.quit()
    finally:
        dash.close()


@pytest.mark.slow
def test_the_summary_of_a_100000_trial_study_opens_in_two_seconds_with_a_bounded_payload(tmp_path) -> None:
    """A study of 100,000 trials (rows copied in SQL, as benchmarks/scale.py builds it): its hpo
    summary loads in Chromium within 2 s warm, weighs under 100 KB and draws at most two points
    per column of its history."""
    from selenium.webdriver.common.by import By

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.pop(0)
    from hpo.ui.summary_page import BINS

    url = f"sqlite:///{tmp_path / 'big.db'}"
    scale.seed_study(url, tmp_path)
    scale.grow(url, 100_000)
    dash = Dashboard(url, tmp_path)
    driver = _chrome_driver()
    try:
        big = len(dash.text("/hpo/studies/big"))  # the server warm
        assert big < 100_000, big
        start = time.monotonic()
        driver.get(f"{dash.url}/hpo/studies/big")  # returns once the page has loaded
        seconds = time.monotonic() - start
        assert "100,000 trials" in driver.find_element(By.TAG_NAME, "body").text
        # 33,400 complete trials drawn as at most two points per column
        assert 0 < len(driver.find_elements(By.CSS_SELECTOR, "svg[aria-label=history] circle")) <= 2 * BINS
        print(f"the summary of 100,000 trials: {big} bytes, loaded in Chromium in {seconds:.2f} s")
        assert seconds <= 2.0, f"the summary of 100,000 trials took {seconds:.1f} s"
        driver.save_screenshot(str(tmp_path / "big.png"))
        if os.environ.get("HPO_SAVE_SCREENSHOT"):
            shutil.copy(tmp_path / "big.png", ROOT / "docs" / "hpo-summary.png")
    finally:
        driver.quit()
        dash.close()


def test_report_writes_plots_matching_the_study(finished, runner, tmp_path) -> None:
    from hpo.ui.report import figures

    out = tmp_path / "report"
    result = invoke(runner, "report", "small", "--storage", finished, "--out", out)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"history.png", "learning_curves.png", "importances.png", "parallel_coordinate.png", "summary.md"} <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    study = optuna.load_study(study_name="small", storage=finished)
    figs, skipped = figures(study)
    assert not skipped
    curves = [ln for ln in figs["learning_curves"].axes[0].get_lines() if len(ln.get_xdata())]
    assert len(curves) == len(study.trials)  # one curve per trial
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert sorted(len(ln.get_xdata()) for ln in curves) == sorted(len(t.intermediate_values) for t in study.trials)
    assert pruned and min(len(ln.get_xdata()) for ln in curves) < 4  # pruned curves are cut short
    summary = (out / "summary.md").read_text()
    assert f"best trial: #{study.best_trial.number}" in summary and "test accuracy of the best model" in summary
    # Each axis names the study's metric, not Optuna's "Objective Value".
    assert figs["history"].axes[0].get_ylabel() == "val_accuracy"
    assert figs["learning_curves"].axes[0].get_ylabel().startswith("val_accuracy")
    assert "val_accuracy" in figs["importances"].axes[0].get_xlabel()


def test_report_without_matplotlib_says_which_extra_to_install(finished, tmp_path) -> None:
    """The README's install has no matplotlib: one line, exit 1, nothing written."""
    import subprocess
    import sys

    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": str(stub.parent)}
    done = subprocess.run([sys.executable, "-m", "hpo", "report", "small", "--storage", finished, "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == ("Error: hpo report draws with matplotlib, which is not installed: pip install "
                                   "'hpo[report]' (or pip install matplotlib)")
    assert not (tmp_path / "r").exists()


def _study_of(n: int) -> optuna.Study:
    """An in-memory study of n trials with 10-epoch curves, a third of them pruned after 3 epochs."""
    import random

    rng = random.Random(n)
    study = optuna.create_study(direction="maximize")
    trials = []
    for i in range(n):
        rate = rng.uniform(0.05, 0.5)
        curve = {e: 1 - (1 - rate) ** (e + 1) for e in range(10)}
        pruned = i % 3 == 2
        if pruned:
            curve = {e: v for e, v in curve.items() if e < 3}
        trials.append(optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=None if pruned else curve[9],
            params={"x": rate}, distributions={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
            intermediate_values=curve))
    study.add_trials(trials)
    return study


@pytest.mark.parametrize("n", [40, pytest.param(100_000, marks=pytest.mark.slow)])
def test_the_learning_curves_stay_legible_at_any_size(n) -> None:
    """The plot area, not a legend naming every trial, fills the figure; the axis labels are whole;
    the best few are named; past a few thousand trials the rest are one band (issue 46)."""
    from hpo.ui.report import NAMED, learning_curves

    need_module("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    ax = learning_curves(_study_of(n), "val_accuracy (each epoch)")
    fig = ax.figure
    fig.set_size_inches(10, 6)
    fig.tight_layout()
    fig.canvas.draw()
    assert ax.get_position().height > 0.7 and ax.get_position().width > 0.8  # the curves have the room
    box = fig.get_window_extent()
    for label in (ax.yaxis.label, ax.xaxis.label, ax.title):
        extent = label.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1
    named = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(t.startswith("#") for t in named) == NAMED and len(named) <= NAMED + 2
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    assert len(lines) == (n if n <= 2000 else NAMED + 1)  # each trial, or the band's median and the best
    import matplotlib.pyplot as plt

    plt.close(fig)
