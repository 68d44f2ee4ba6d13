"""A tracking store that is down, locked or slow costs a clear message before the work, and nothing after it."""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from repo_params import params as with_params
from repo_params import write_params
from ruamel.yaml import YAML

from medgemma_breakhis.core import logs
from medgemma_breakhis.core.errors import ParamsError
from medgemma_breakhis.core.stage import stage_entry
from medgemma_breakhis.model.load import ModelLoadError, load_base_model
from medgemma_breakhis.track import runs as tracking
from medgemma_breakhis.track import store as tracking_store
from medgemma_breakhis.track.runs import StageRun, tag_train_run, tracked_run
from medgemma_breakhis.track.store import STORE_CHECK_TIMEOUT_S, TrackingError, check_tracking_store, experiment_id
from medgemma_breakhis.train.trainer import run_training
from tools.precision_comparison import _latest_stage_run


class HalfFailingStore(BaseHTTPRequestHandler):
    """An MLflow server that answers the experiment requests (and so passes the store check) and fails every other
    one with 500, as a server whose database broke under it does."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/api/2.0/mlflow/experiments/"):
            experiment = {"experiment_id": "1", "name": tracking_store.EXPERIMENT_NAME, "lifecycle_stage": "active"}
            status, body = 200, {"experiment": experiment, "experiments": [experiment]}
        else:
            status, body = 500, {"error_code": "INTERNAL_ERROR", "message": "the database is gone"}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def half_failing_store() -> Iterator[str]:
    """The URL of a `HalfFailingStore` on 127.0.0.1, with a user name and password in it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HalfFailingStore)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://carol:hunter2pw@127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded store of this test's own, as MLFLOW_TRACKING_URI."""
    path = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path}")
    return path


def test_dead_http_store_fails_in_seconds_naming_it_without_its_password() -> None:
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"MLflow tracking store http://127.0.0.1:9 cannot be used") as caught:
        check_tracking_store("http://someone:s3cret@127.0.0.1:9")
    assert time.monotonic() - started < 15
    assert "s3cret" not in str(caught.value) and "MLFLOW_TRACKING_URI" in str(caught.value)


def test_a_store_that_passes_the_check_and_then_fails_refuses_the_stage_in_seconds_without_its_password(
    half_failing_store: str, split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", half_failing_store)
    params = with_params({"model": {"id": "tiny-gemma3"}})
    started = time.monotonic()
    with (
        pytest.raises(
            TrackingError, match=r"^MLflow tracking store http://127\.0\.0\.1:\d+ cannot be used: "
        ) as caught,
        tracked_run("baseline", params, split_dir / "test.csv", tmp_path / "untracked.json"),
    ):
        pytest.fail("the stage's work must not start")
    assert time.monotonic() - started < 15
    assert "runs/search" in str(caught.value) and "Check that the server is up" in str(caught.value)
    assert "hunter2pw" not in str(caught.value) and "carol" not in str(caught.value)
    assert mlflow.active_run() is None


def test_a_store_failing_after_the_work_costs_seconds_and_lists_what_was_not_tracked(
    half_failing_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e")
    # the stage's run and its pipeline's, started while the store worked
    parent, run = (client.create_run(experiment).info.run_id for _ in range(2))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", half_failing_store)
    tracking_store.bound_store_requests()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text("{}")
    tracked = StageRun(run, parent, tmp_path / "metrics" / "train.untracked.json", metrics={"accuracy": 1.0})
    tracked.artifacts.append((tmp_path / "metrics" / "train.json", "metrics"))
    tracked.then.append(("the confusion matrices", lambda: mlflow.MlflowClient().set_tag(run, "x", "y")))
    started = time.monotonic()
    tracked.end("FINISHED")
    assert time.monotonic() - started < 20  # 852abeb: minutes per write (MLflow's 7 retries with backoff)
    record = json.loads((tmp_path / "metrics" / "train.untracked.json").read_text())
    assert record["tracking_uri"].startswith("http://127.0.0.1:") and record["run_id"] == run
    assert [item.split(":")[0] for item in record["not_tracked"]] == [
        "the metrics",
        f"the artifact {tmp_path / 'metrics' / 'train.json'}",
        "the confusion matrices",
        "the tracking_incomplete tag",
        "the end of the stage's run",
        "the end of the pipeline's run",
    ]
    assert "hunter2pw" not in json.dumps(record) + caplog.text
    assert mlflow.active_run() is None


def test_credentials_in_the_store_url_are_moved_to_mlflow_s_variables_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = "https://carol:p%40ss-w0rd@mlflow.example.org:8443/prefix?token=tok-123456&x=1"
    assert logs.shown_uri(uri) == "https://mlflow.example.org:8443/prefix?token=***&x=***"
    assert logs.shown_uri("sqlite:////repo/mlflow.db") == "sqlite:////repo/mlflow.db"
    assert logs.shown_uri("http://carol:pw@[fd00::1]:5000/x") == "http://[fd00::1]:5000/x"  # brackets kept
    message = f"API request to {uri.replace('%40', '@')} failed"
    assert "p@ss-w0rd" not in logs.redacted(message, uri) and "tok-123456" not in logs.redacted(message, uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://carol:p%40ss-w0rd@127.0.0.1:5000")
    tracking_store.bound_store_requests()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("carol", "p@ss-w0rd")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "10"


@pytest.mark.slow  # trains, or waits out the store's timeouts
def test_corrupt_or_locked_sqlite_store_fails_in_seconds_naming_the_file(tmp_path: Path, lock_store) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database" * 100)
    with pytest.raises(
        TrackingError,
        match=f"sqlite:///{corrupt} cannot be used: DatabaseError: file is not a "
        f"database\nCheck that {corrupt} is a writable MLflow database",
    ):
        check_tracking_store(f"sqlite:///{corrupt}")

    store = tmp_path / "mlflow.db"
    check_tracking_store(f"sqlite:///{store}")  # creates it
    started = time.monotonic()
    with (
        lock_store(store),
        pytest.raises(TrackingError, match=f"sqlite:///{store} cannot be used: .*database is locked"),
    ):
        check_tracking_store(f"sqlite:///{store}")
    assert STORE_CHECK_TIMEOUT_S <= time.monotonic() - started < 15


@pytest.mark.slow  # trains, or waits out the store's timeouts
def test_stage_with_a_dead_store_stops_before_the_model_loads_with_a_message_not_a_traceback(
    synthetic_root: Path, split_dir: Path, tmp_path: Path, stage_env: dict[str, str]
) -> None:
    write_params(tmp_path, {"model": {"id": "tiny-gemma3"}})
    env = stage_env | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.baseline",
            "--images",
            str(synthetic_root),
            "--test",
            str(split_dir / "test.csv"),
            "--metrics",
            "baseline.json",
            "--predictions",
            "predictions.csv",
            "--roc",
            "roc.csv",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1
    assert "MLflow tracking store http://127.0.0.1:9 cannot be used" in result.stderr
    assert "Traceback" not in result.stderr and "loaded tiny-gemma3" not in result.stderr


@pytest.mark.slow  # a stage in a subprocess, as dvc runs it
def test_a_stage_against_a_half_failing_store_with_a_password_ends_in_seconds_in_one_line_without_it(
    half_failing_store: str, synthetic_root: Path, split_dir: Path, tmp_path: Path, stage_env: dict[str, str]
) -> None:
    write_params(tmp_path, {"model": {"id": "tiny-gemma3"}})
    started = time.monotonic()
    result = subprocess.run(
        [
            *(sys.executable, "-m", "stages.baseline", "--images", str(synthetic_root)),
            *("--test", str(split_dir / "test.csv"), "--metrics", "baseline.json"),
            *("--predictions", "predictions.csv", "--roc", "roc.csv"),
        ],
        cwd=tmp_path,
        env=stage_env | {"MLFLOW_TRACKING_URI": half_failing_store},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.monotonic() - started  # 852abeb: 282 s, a traceback, and the password in its last line
    assert result.returncode == 1 and elapsed < 60, (elapsed, result.stderr[-3000:])
    (error,) = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert "MLflow tracking store http://127.0.0.1:" in error and "runs/search" in error
    assert "hunter2pw" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "baseline.json").exists()


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "cv/dvc.yaml"])
def test_what_was_not_tracked_is_a_dvc_output_of_every_tracked_stage_so_experiments_keep_it(pipeline: str) -> None:
    """852abeb: metrics/<name>.untracked.json was no output, so DVC left it out of `--temp`, queued and cloud
    experiments ("will not be included in experiment commits"), and only a RUNNING MLflow run remained."""
    stages = YAML(typ="safe").load(Path(__file__).resolve().parents[1] / pipeline)["stages"]
    for name in ("baseline", "train", "evaluate"):
        metrics = re.search(r"--metrics (\S+)", stages[name]["cmd"])[1]
        record = tracking.untracked_record(Path(metrics)).as_posix()
        assert {record: {"cache": False}} in stages[name]["outs"], f"{pipeline}: {name} does not keep {record}"


def test_a_fully_tracked_stage_writes_an_empty_record(store: Path, split_dir: Path, tmp_path: Path) -> None:
    record = tmp_path / "metrics" / "baseline.untracked.json"
    with tracked_run("baseline", with_params({}), split_dir / "test.csv", record):
        pass
    assert json.loads(record.read_text()) == {"not_tracked": []}  # always there, as DVC wants an output


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """For a test that calls `stage_entry` in-process: this worker's objects are collected again afterwards."""
    yield
    gc.unfreeze()
    gc.enable()


def test_a_stage_started_as_a_script_collects_nothing_while_it_imports_then_freezes_what_it_imported(
    unfrozen: None,
) -> None:
    """`python -m stages.<name>`: while Python locates the module, sys.argv[0] is "-m" (its documentation of -m)."""
    repository = Path(__file__).resolve().parents[1]
    started = "import gc, sys; sys.argv[0] = '-m'; import stages; print(gc.isenabled())"
    result = subprocess.run([sys.executable, "-c", started], cwd=repository, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False"]
    imported = "import gc, stages.download; print(gc.isenabled())"  # as a test or a notebook imports a stage
    result = subprocess.run(
        [sys.executable, "-c", imported], cwd=repository, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["True"]

    gc.disable()
    frozen_before = gc.get_freeze_count()
    stage_entry(lambda: None)
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen_before


def test_interruptions_and_a_full_disk_end_a_stage_in_one_line(
    caplog: pytest.LogCaptureFixture, unfrozen: None
) -> None:
    """852abeb: SIGTERM and a full disk ended a stage in a traceback (with nothing partial left)."""

    def interrupted() -> None:
        raise KeyboardInterrupt("SIGTERM received")

    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "metrics/baseline.json")

    with pytest.raises(SystemExit) as stopped:
        stage_entry(interrupted)
    with pytest.raises(SystemExit) as full:
        stage_entry(disk_full)
    assert (stopped.value.code, full.value.code) == (130, 1)
    assert [record.getMessage() for record in caplog.records] == [
        "KeyboardInterrupt: SIGTERM received",
        (
            "No space left on device: metrics/baseline.json. Free some space there (or set TMPDIR elsewhere for "
            "temporary files) and run the stage again; nothing partial was left"
        ),
    ]
    with pytest.raises(FileNotFoundError):  # any other OSError is a bug: its traceback stays
        stage_entry(lambda: Path("/proc/no-such-place/x").write_text("x"))


def test_expected_errors_are_one_message_without_traceback(tmp_path: Path, stage_env: dict[str, str]) -> None:
    write_params(tmp_path, {"data": {"source": "local", "path": str(tmp_path / "nowhere")}})
    command = [sys.executable, "-m", "stages.download", "--out", "data/raw", "--excluded", "data/excluded.csv"]
    result = subprocess.run(
        command, cwd=tmp_path, env=stage_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert f"dataset folder {tmp_path / 'nowhere'} does not exist; set data.path" in result.stderr
    assert "Traceback" not in result.stderr

    (tmp_path / "params.yaml").write_text("")
    result = subprocess.run(
        command, cwd=tmp_path, env=stage_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 1
    assert "params file params.yaml is empty" in result.stderr and "Traceback" not in result.stderr


def test_a_distribution_not_installed_under_its_name_is_recorded_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "TRACKED_DISTRIBUTIONS", (*tracking.TRACKED_DISTRIBUTIONS, "no-such-distribution"))
    versions = tracking.library_versions()
    assert versions["no-such-distribution"] == "not installed"
    assert versions["mlflow"] == mlflow.__version__


def test_names_with_quotes_cannot_break_a_search(
    store: Path, split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = 'it\'s-"mine"'
    monkeypatch.setenv("DVC_EXP_NAME", name)
    params = with_params({"model": {"id": "tiny-gemma3"}})
    adapter = str(tmp_path / "it's" / "adapter")
    with tracked_run("train", params, split_dir / "train.csv", tmp_path / "train.untracked.json") as train:
        train.tags["adapter_path"] = adapter
    with tracked_run("evaluate", params, split_dir / "test.csv", tmp_path / "eval.untracked.json") as evaluate:
        pass
    parent = train.parent_run_id
    assert evaluate.parent_run_id == parent  # the second stage found its pipeline's run
    tag_train_run(parent, Path(adapter), {"found": "yes"})  # the train run of a path with a quote in it
    assert mlflow.MlflowClient().get_run(train.run_id).data.tags["found"] == "yes"
    latest = _latest_stage_run(mlflow.MlflowClient(), experiment_id(), name, "evaluate")
    assert latest.info.run_id == evaluate.run_id


@pytest.mark.slow  # trains, or waits out the store's timeouts
def test_metrics_the_store_dropped_are_logged_again(store: Path, tmp_path: Path, lock_store) -> None:
    history = [{"loss": 3.0 - step, "learning_rate": 0.1, "step": step} for step in (1, 2, 3)]
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    with mlflow.start_run() as run:
        mlflow.log_metrics({"loss": 2.0, "learning_rate": 0.1}, step=1)
        with lock_store(store):  # longer than MLflow's 20 s sqlite busy timeout: its async logger drops the batch
            mlflow.log_metrics({"loss": 1.0, "learning_rate": 0.1}, step=2, synchronous=False)
            time.sleep(22)
        mlflow.flush_async_logging()
        client = mlflow.MlflowClient()
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]  # dropped for good
        mlflow.log_metrics({"loss": 0.0, "learning_rate": 0.1}, step=3, synchronous=False)
    tracked = StageRun(run.info.run_id, run.info.run_id, tmp_path / "untracked.json", history=history)
    tracked.end("FINISHED")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "learning_rate")) == [1, 2, 3]
    assert json.loads((tmp_path / "untracked.json").read_text()) == {"not_tracked": []}


def test_the_history_is_checked_with_one_query_per_metric_not_per_logged_value(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real run logs thousands of steps: one history query per logged value made ending it quadratic."""
    history = [{"loss": 1.0 / step, "learning_rate": 0.1, "step": step} for step in range(1, 41)]
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    with mlflow.start_run() as run:
        pass
    client = mlflow.MlflowClient()
    queried: list[str] = []
    read_history = mlflow.MlflowClient.get_metric_history
    monkeypatch.setattr(
        mlflow.MlflowClient,
        "get_metric_history",
        lambda self, *args: queried.append(args[1]) or read_history(self, *args),
    )
    StageRun(run.info.run_id, run.info.run_id, tmp_path / "untracked.json", history=history).end("FINISHED")
    assert sorted(queried) == ["learning_rate", "loss"]
    assert [m.step for m in read_history(client, run.info.run_id, "loss")] == list(range(1, 41))


@pytest.mark.slow  # trains, or waits out the store's timeouts
def test_store_failing_right_after_training_costs_nothing_and_the_run_does_not_look_complete(
    synthetic_root: Path, split_dir: Path, store: Path, tmp_path: Path, lock_store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the stage's repository, whose DVC cache is looked up: none here
    train_csv = tmp_path / "train.csv"
    pd.read_csv(split_dir / "train.csv").head(4).to_csv(train_csv, index=False)
    params = with_params(
        {
            "model": {"id": "tiny-gemma3"},
            "train": {"epochs": 1, "batch_size": 1, "precision": "fp32"},
            "execution": {"checkpoint_steps": 2},
        }
    )
    metrics, adapter, checkpoints = tmp_path / "metrics" / "train.json", tmp_path / "adapter", tmp_path / "checkpoints"
    trained_at: list[float] = []

    def trained() -> bool:
        if metrics.exists() and not trained_at:
            trained_at.append(time.monotonic())
        return bool(trained_at)

    # from the moment training is over until the stage has returned
    with lock_store(store, when=trained) as taken:
        result = run_training(
            params,
            image_root=synthetic_root,
            train_csv=train_csv,
            adapter_dir=adapter,
            metrics_path=metrics,
            loss_path=tmp_path / "loss.csv",
            checkpoint_root=checkpoints,
        )
    assert taken.is_set()
    # MLflow waits 20 s on a locked sqlite file for the first write that fails; the last writes only ask the lock
    assert time.monotonic() - trained_at[0] < 45
    assert mlflow.active_run() is None  # the ends not attempted left no run active for what this process runs next
    assert result is not None and result["global_steps"] == 4
    assert (adapter / "adapter_config.json").is_file() and metrics.is_file()
    assert len(list(checkpoints.glob("*/checkpoint-*"))) == 1  # the last, kept until the DVC cache has the adapter
    record = json.loads((tmp_path / "metrics" / "train.untracked.json").read_text())
    assert record["not_tracked"] and any("database is locked" in item for item in record["not_tracked"])
    assert any("not attempted, the store is still locked" in item for item in record["not_tracked"])
    (run,) = mlflow.MlflowClient().search_runs([experiment_id()], "tags.stage = 'train'")
    assert run.info.run_id == record["run_id"]
    assert run.info.status != "FINISHED" or "tracking_incomplete" in run.data.tags


def test_lora_target_modules_that_match_nothing_are_refused_before_the_model_loads(
    synthetic_root: Path, split_dir: Path, store: Path, tmp_path: Path
) -> None:
    params = with_params({"model": {"id": "tiny-gemma3"}, "lora": {"target_modules": "no_such_proj"}})
    with pytest.raises(ParamsError, match=r"lora.target_modules='no_such_proj' matches no module of tiny-gemma3"):
        run_training(
            params,
            image_root=synthetic_root,
            train_csv=split_dir / "train.csv",
            adapter_dir=tmp_path / "adapter",
            metrics_path=tmp_path / "train.json",
            loss_path=tmp_path / "loss.csv",
            checkpoint_root=tmp_path / "checkpoints",
        )
    assert not store.exists()  # refused before the stage's run, let alone the model


def test_model_id_that_is_a_missing_local_path_says_so(split_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    message = r"model.id='./models/medgemma' is a local path, and no folder is there"
    with pytest.raises(ModelLoadError, match=message):
        load_base_model(with_params({"model": {"id": "./models/medgemma"}}).model, "fp32")
    with pytest.raises(ModelLoadError, match=message):  # the stage's first look at the model, before the store's
        run_training(
            with_params({"model": {"id": "./models/medgemma"}}),
            image_root=synthetic_root,
            train_csv=split_dir / "train.csv",
            adapter_dir=tmp_path / "adapter",
            metrics_path=tmp_path / "train.json",
            loss_path=tmp_path / "loss.csv",
            checkpoint_root=tmp_path / "checkpoints",
        )


@pytest.mark.slow
def test_stages_starting_together_on_a_new_store_both_get_the_experiment(
    tmp_path: Path, stage_env: dict[str, str]
) -> None:
    """DVC's queue workers start their stages at once: two processes creating a new sqlite store's tables together
    broke MLflow's schema migration ("No such index") before the store's first use took a lock."""
    env = stage_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    code = "from medgemma_breakhis.track.store import experiment_id; print(experiment_id())"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
