"""Reviewing a study: a small search logged to a real `mlflow server`, checked through MLflow's
client and in the MLflow UI rendered by headless Chromium; the plots; parallel-safe logging;
`autocompress ui` and `report`'s plots."""
from __future__ import annotations

import csv
import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from mlflow.tracking import MlflowClient

from autocompress import cli
from autocompress.api import search
from autocompress.artifact import load
from autocompress.plantable import granularity_mix
from autocompress.tracking import Tracker

STUDY = "review-study"
QUICK = dict(model="lenet5", data="digits", trials=3, epochs=2, baseline_epochs=3, max_batches=3,
             progress=False, seed=0, final_top=0,  # with warm start: its sensitivity gives the heat map
             stop_at_baseline=False)  # these tests count trials: digits' weak baseline is matched at once
ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")  # screenshots kept by the browser test
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: str, seconds: float = 240) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{open(log).read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no answer from {url} after {seconds:.0f}s:\n{open(log).read()[-2000:]}")


def _warm_caches(out: str) -> None:
    """Train the test's baseline and its sensitivity table into their caches, exactly as `search`
    will ask for them, so that this work overlaps the server's start (a miss only costs time)."""
    from autocompress.api import load_inputs
    from autocompress.sensitivity import cached_analyse
    from autocompress.train import baseline

    spec, bundle, _ = load_inputs(QUICK["model"], QUICK["data"], None, None, QUICK["seed"], None, 0.1)
    net, _ = baseline(spec, bundle, epochs=QUICK["baseline_epochs"], seed=QUICK["seed"], progress=False)
    cached_analyse(net, bundle.val, bundle.train.x[:2], os.path.join(out, "sensitivity"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store; yields (url, store folder, the
    search's output folder with warm caches)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    out = tmp_path_factory.mktemp("review-search")
    port = _free_port()
    log = str(root / "server.log")
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--default-artifact-root", str(root / "art"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _warm_caches(str(out))
        _wait_http(f"{url}/health", proc, log)
        yield url, root, out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers, started here
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def searched(server):
    url, _, out = server
    outcome = search("8x", out=str(out), study=STUDY, tracking_uri=url, register="review-best", **QUICK)
    return url, out, outcome


def _runs(client: MlflowClient) -> tuple[object, list]:
    exp = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("autocompress.role") == "study"]
    children = [r for r in runs if r.data.tags.get("autocompress.role") == "trial"]
    assert len(parents) == 1
    return parents[0], children


@pytest.mark.slow
def test_server_run_holds_one_child_per_trial_with_metrics_plan_and_tags(searched):
    url, _, outcome = searched
    client = MlflowClient(tracking_uri=url)
    parent, children = _runs(client)
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [t.number for t in outcome.study.trials]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for c in children:
        run_id, tags = c.info.run_id, c.data.tags
        trial = outcome.study.trials[int(tags["optuna.trial"])]
        assert c.info.run_name == f"trial-{trial.number}"
        assert tags["state"] in ("complete", "infeasible", "early-stopped", "failed")
        assert tags["granularity"] == granularity_mix(trial.user_attrs["plan"])
        assert c.data.metrics["size_bytes"] == trial.user_attrs["size_bytes"]
        assert tags["budget_met"] == str(trial.user_attrs["size_bytes"] <= outcome.limit).lower()
        assert {"plan.json", "plan.csv"} <= {a.path for a in client.list_artifacts(run_id)}
        rows = list(csv.DictReader(open(client.download_artifacts(run_id, "plan.csv"))))
        assert [r["layer"] for r in rows] == list(trial.user_attrs["plan"]["layers"])
        if tags["state"] == "complete":  # one value per epoch, on the same steps
            for key in ("val_accuracy", "train_loss"):
                steps = sorted(m.step for m in client.get_metric_history(run_id, key))
                assert steps == [1, 2], key
            assert c.data.metrics["val_accuracy"] == pytest.approx(trial.value)
    assert {"complete", "infeasible"} & {c.data.tags["state"] for c in children}


@pytest.mark.slow
def test_server_parent_holds_plots_summary_and_system_metrics(searched):
    url, out, outcome = searched
    client = MlflowClient(tracking_uri=url)
    parent, _ = _runs(client)
    pid = parent.info.run_id
    metrics = parent.data.metrics
    assert metrics["baseline_val_accuracy"] > 0 and metrics["baseline_fp32_bytes"] > 0
    assert metrics["best_test_accuracy"] == pytest.approx(outcome.test_accuracy)
    assert parent.data.params["budget_bytes"] == str(outcome.limit)
    names = {a.path for a in client.list_artifacts(pid, "plots")}
    assert names == {"plots/accuracy_vs_size.png", "plots/history.png", "plots/best_plan_layers.png",
                     "plots/sensitivity.png"}
    for name in names:
        data = open(client.download_artifacts(pid, name), "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert os.path.isfile(os.path.join(out, "plots", STUDY, os.path.basename(name)))  # kept locally too
    summary = open(client.download_artifacts(pid, "summary.md")).read()
    assert f"# Study {STUDY}" in summary and "## Top trials" in summary and "## Best plan per layer" in summary
    assert f"best: trial {outcome.best.number}," in summary
    for t in outcome.study.trials:
        assert f"\n| {t.number} | " in summary
    pytest.importorskip("psutil")
    assert any(k.startswith("system/") for k in metrics)


@pytest.mark.slow
def test_best_model_is_an_mlflow_pytorch_model_registered_and_predicting_like_load(searched):
    import mlflow
    import mlflow.pytorch

    from autocompress.data import load_data

    url, _, outcome = searched
    client = MlflowClient(tracking_uri=url)
    parent, _ = _runs(client)
    outputs = parent.outputs.model_outputs
    assert len(outputs) == 1
    version = client.get_model_version("review-best", "1")
    assert version.run_id == parent.info.run_id
    x = load_data("digits", seed=0).test.x[:64]
    expected = load(outcome.best_path)(x)
    mlflow.set_tracking_uri(url)
    try:
        for uri in (f"models:/{outputs[0].model_id}", "models:/review-best/1"):
            model = mlflow.pytorch.load_model(uri)
            with torch.no_grad():
                assert torch.equal(model(x), expected), uri
    finally:
        mlflow.set_tracking_uri(None)


def _page_text(dom: str) -> str:
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def _chromium(url: str, profile: str, screenshot: str) -> str:
    """Render `url` in headless Chromium (virtual time lets the React app load its data); returns the
    DOM after rendering and writes a screenshot."""
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1400,900",
            f"--screenshot={screenshot}", "--dump-dom", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_mlflow_ui_in_headless_chromium_shows_the_experiment_and_its_trial_runs(searched, tmp_path):
    url, _, outcome = searched
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name(STUDY)
    parent, _ = _runs(client)
    os.makedirs(ARTIFACTS, exist_ok=True)
    # trial runs are nested (collapsed) under the parent; a filter with a non-date sort lists them flat
    runs_url = (f"{url}/#/experiments/{exp.experiment_id}/runs?searchFilter=attributes.run_name%20LIKE%20"
                "%27trial-%25%27&orderByKey=metrics.%60size_bytes%60&orderByAsc=true")
    shot = os.path.join(ARTIFACTS, "mlflow-ui-trials.png")
    text = _page_text(_chromium(runs_url, str(tmp_path / "profile1"), shot))
    assert STUDY in text and "Training runs" in text
    for t in outcome.study.trials:
        assert re.search(rf"\btrial-{t.number}\b", text), f"trial-{t.number} not on the page"
    assert f"{len(outcome.study.trials)} matching runs" in text
    assert open(shot, "rb").read(8) == PNG_MAGIC and os.path.getsize(shot) > 20_000
    # the parent run's artifacts page shows the plots and the summary
    plot_url = (f"{url}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts/plots/"
                "accuracy_vs_size.png")
    shot = os.path.join(ARTIFACTS, "mlflow-ui-parent-plot.png")
    text = _page_text(_chromium(plot_url, str(tmp_path / "profile2"), shot))
    assert parent.info.run_name in text and "summary.md" in text and "accuracy_vs_size.png" in text
    assert os.path.getsize(shot) > 20_000


@pytest.mark.slow
def test_parallel_trials_log_only_to_their_own_runs(server):
    url, _, _ = server
    tracker = Tracker(url, "parallel-logging")
    tracker.start_parent("parallel", {"n": 6})
    plan = {"layers": {"fc": {"prune": "nm", "n": 2, "m": 4, "bits": 4}}}
    run_ids: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def trial(n: int) -> None:
        try:
            run_ids[n] = tracker.start_trial(n, {"number": n}, plan)
            barrier.wait()
            for step in range(1, 9):
                tracker.log_metrics(run_ids[n], {"val_accuracy": n + step / 100, "train_loss": 10 * n + step}, step)
            tracker.end(run_ids[n], "complete")
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=trial, args=(n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    tracker.end(tracker.parent_id, "complete")
    assert not errors
    for n, run_id in run_ids.items():
        run = tracker.client.get_run(run_id)
        assert run.data.params == {"number": str(n)} and run.data.tags["optuna.trial"] == str(n)
        for key, value in (("val_accuracy", lambda s: n + s / 100), ("train_loss", lambda s: 10 * n + s)):
            history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))
            assert history == [(s, pytest.approx(value(s))) for s in range(1, 9)]


@pytest.mark.slow
def test_report_writes_the_plots_and_prints_the_table(searched, tmp_path, capsys):
    _, out, outcome = searched
    assert cli.main(["report", "--out", str(out), "--plots", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert f"study {STUDY}" in printed and "per-layer plan" in printed
    for name in ("accuracy_vs_size.png", "history.png", "best_plan_layers.png", "sensitivity.png"):
        path = tmp_path / "p" / name
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
        assert str(path) in printed


def test_ui_starts_mlflow_ui_on_the_store_and_prints_the_url(tmp_path, monkeypatch, capsys):
    assert cli.main(["ui", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow store" in err and "mlflow.db" in err
    (tmp_path / "mlflow.db").write_bytes(b"")
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert cli.main(["ui", "--out", str(tmp_path), "--port", "5123"]) == 0
    assert "http://127.0.0.1:5123" in capsys.readouterr().out
    argv = calls[0]
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"


def test_summary_md_is_readable_for_300_layers_and_lists_small_plans_per_layer():
    from autocompress.review import summary_markdown
    from test_report import study_of

    big = summary_markdown(study_of(300))
    assert "## Best plan (trial 1)" in big and "300 layers; bits 8:300" in big and "plan.csv" in big
    assert "blocks.0.fc" not in big and max(len(line) for line in big.splitlines()) < 200
    small = summary_markdown(study_of(4))
    assert "## Best plan per layer (trial 1)" in small and sum(line.startswith("| blocks.") for line in small.splitlines()) == 4


def test_a_study_shorter_than_one_sampling_interval_still_has_system_metrics(tmp_path):
    pytest.importorskip("psutil")
    url = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(url, "short-study", artifact_dir=str(tmp_path / "artifacts"))
    pid = tracker.start_parent("short", {"n": 1})
    tracker.end(pid, "complete")  # well within the monitor's first 5 s interval
    metrics = MlflowClient(tracking_uri=url).get_run(pid).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
