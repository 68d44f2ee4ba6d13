"""tools.models (make models, promote, mlflow-ui) on a store of its own, with versions but no trained model behind
them: the aliases it lists, the libraries it imports to read a table, and the UI's link, printed once it answers."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
from ruamel.yaml import YAML

from tools import models

REPO = Path(__file__).resolve().parents[1]
NAME = YAML(typ="safe").load(REPO / "params.yaml")["registry"]["model_name"]
# Read a table without them: each is seconds of imports on a 2-core machine.
MODEL_LIBRARIES = {"torch", "transformers", "peft", "accelerate", "sklearn", "matplotlib", "datasets"}


@pytest.fixture
def registered(stage_folder: Path) -> str:
    """Two versions of the params' model (their source a path: no metrics) and the stages' experiment, in the
    folder's store; returns the store's URI."""
    shutil.copy(REPO / "params.yaml", stage_folder)
    store = os.environ["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(store)  # not MLflow's current store: an earlier test's, in this process
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, source=str(stage_folder / "model"))
    client.create_experiment("medgemma-breakhis")
    return store


def test_make_models_lists_the_aliases_make_promote_set(registered: str, capsys: pytest.CaptureFixture[str]) -> None:
    models.main(["promote", "1"])
    models.main(["promote", "2", "--alias", "staging"])
    capsys.readouterr()
    models.main(["list"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["1"][1] == "champion" and rows["2"][1] == "staging", rows
    assert models.default_model_uri(NAME) == f"models:/{NAME}@champion"


@pytest.mark.slow  # a subprocess, 3-5 s
def test_models_and_promote_import_no_model_library(registered: str, stage_env: dict[str, str]) -> None:
    script = (
        "import json, sys; from tools import models; models.main(['list']); models.main(['promote', '2']); "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=stage_env | {"MLFLOW_TRACKING_URI": registered},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "champion" in done.stdout
    imported = MODEL_LIBRARIES & set(json.loads(done.stdout.splitlines()[-1]))
    assert not imported, f"imported in {time.monotonic() - started:.1f} s: {sorted(imported)}"


def test_the_tool_opens_the_stages_store_and_experiment(stage_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medgemma_breakhis.track import store

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the repository's own store
    models.open_store()
    assert mlflow.get_tracking_uri() == store.tracking_uri() == os.environ["MLFLOW_TRACKING_URI"]
    (stage_folder / "mlflow.db").write_text("not a database")
    with pytest.raises(store.TrackingError, match="mlflow.db cannot be used: .*file is not a database"):
        models.open_store()


def test_a_server_is_opened_by_the_stages_code_credentials_out_of_its_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from medgemma_breakhis.track.store import TrackingError

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://someone:hunter2-secret@127.0.0.1:{port}")
    with pytest.raises(TrackingError) as refused:
        models.open_store()
    assert f"http://127.0.0.1:{port}" in str(refused.value) and "hunter2" not in str(refused.value)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2-secret"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # runs.STORE_REQUEST_POLICY


def test_mlflow_ui_refuses_a_port_in_use_before_starting(registered: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a server started: {args}")

    monkeypatch.setattr(subprocess, "Popen", started)
    monkeypatch.setattr(os, "execvp", started)  # which would turn this test process into the server
    with socket.create_server(("127.0.0.1", 0)) as taken:  # another server's: its answers are not this store's UI
        port = taken.getsockname()[1]
        with pytest.raises(models.ExpectedError, match=f"port {port} is taken on 127.0.0.1: stop its server, or make"):
            models.main(["ui", "--port", str(port)])


@pytest.mark.slow  # an MLflow server, 15-40 s on 2 cores
def test_mlflow_ui_prints_its_link_once_the_server_answers_and_runs_one_worker(
    registered: str, stage_env: dict[str, str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen(
        [sys.executable, "-m", "tools.models", "ui", "--port", str(port)],
        # mlflow from PATH, as under make (whose PATH starts with .venv/bin)
        env=stage_env
        | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{stage_env['PATH']}", "MLFLOW_TRACKING_URI": registered},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, which the end of the test stops as Ctrl-C would
    )
    watchdog = threading.Timer(90, os.killpg, (ui.pid, signal.SIGKILL))
    watchdog.start()
    try:
        printed = []
        for line in ui.stdout:  # the tool's lines and the server's
            printed.append(line)
            if line.startswith("Open "):
                link = line.split()[1]
                answer = requests.get(link, timeout=5)  # at once: it answered before the link was printed
                break
        else:
            pytest.fail(f"no link printed:\n{''.join(printed)}")
        assert answer.ok and link.startswith(f"http://127.0.0.1:{port}/#/experiments/"), answer.status_code
        tree = [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
        commands = [" ".join(process.cmdline()) for process in tree]
        # the tool, mlflow ui and one uvicorn worker; no job runner, no huey consumers
        assert len(tree) == 3 and not [command for command in commands if "huey" in command], commands
    finally:
        watchdog.cancel()
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)
    assert not psutil.wait_procs(tree, timeout=30)[1], "Ctrl-C leaves no process running"
