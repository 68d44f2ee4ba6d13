"""tools.models (make models, promote, mlflow-ui) on a store of its own, with versions but no trained model behind
them: the aliases it lists, the libraries it imports to read a table, and the UI's link, printed once it answers."""

import base64
import contextlib
import http.server
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
from types import SimpleNamespace

import mlflow
import psutil
import pytest
import requests
from ruamel.yaml import YAML

from medgemma_breakhis.core.files import pipeline_paths, sha256
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
    assert models.model_uri(NAME) == f"models:/{NAME}@champion"


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


class SilentServer:
    """A port that takes connections and never answers, as a hung server does."""

    def __enter__(self) -> int:
        self.socket = socket.create_server(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.socket.close()


COMMANDS = {
    "make models": ["-m", "tools.models", "list"],
    "make promote": ["-m", "tools.models", "promote", "1"],
    "make predict": ["-m", "tools.predict", "slide.png"],
}


@pytest.mark.slow  # a subprocess each, 3-20 s
@pytest.mark.parametrize("server", ["closed port", "silent server"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_dead_server_is_refused_within_a_minute_without_its_password(
    stage_folder: Path, stage_env: dict[str, str], server: str, command: str
) -> None:
    shutil.copy(REPO / "params.yaml", stage_folder)
    (stage_folder / "slide.png").write_bytes(b"an image")
    with SilentServer() as silent, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = silent if server == "silent server" else closed.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, *COMMANDS[command]],
            env=stage_env | {"MLFLOW_TRACKING_URI": f"http://someone:hunter2-secret@127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    seconds = time.monotonic() - started
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert f"MLflow tracking store http://127.0.0.1:{port} cannot be used" in errors[0], errors
    assert "hunter2" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    print(f"{command} against a {server}: refused in {seconds:.1f} s")


@pytest.mark.parametrize("store", ["locked", "corrupt"])
@pytest.mark.parametrize("command", ["list", "promote", "predict"])
def test_a_locked_or_corrupt_store_is_refused_in_one_line(
    registered: str, lock_store, store: str, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medgemma_breakhis.track import store as tracking
    from tools import predict

    monkeypatch.setattr(tracking, "STORE_CHECK_TIMEOUT_S", 1)  # 10 s for a lock another process releases
    db = Path(registered.removeprefix("sqlite:///"))
    Path("slide.png").write_bytes(b"an image")
    run = {"list": lambda: models.main(["list"]), "promote": lambda: models.main(["promote", "1"])}
    run["predict"] = lambda: predict.main(["slide.png"])
    if store == "corrupt":
        db.write_bytes(b"not a database" * 100)
    locked = lock_store(db) if store == "locked" else contextlib.nullcontext()
    with locked, pytest.raises(tracking.TrackingError) as refused:
        run[command]()
    reason = "database is locked" if store == "locked" else "file is not a database"
    assert str(refused.value).splitlines()[0].endswith(reason), refused.value  # the store's line, then the fix


def test_make_serve_hands_the_server_no_password_in_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    heard = []

    class Store(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # the store check: a search of experiments, answered with none
            self.rfile.read(int(self.headers["Content-Length"]))
            heard.append(self.headers["Authorization"])
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    served = []
    monkeypatch.setattr(os, "execvp", lambda file, args: served.append((args, dict(os.environ))))
    with http.server.HTTPServer(("127.0.0.1", 0), Store) as store:
        threading.Thread(target=store.serve_forever, daemon=True).start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://someone:hunter2-secret@127.0.0.1:{store.server_port}")
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        models.main(["serve", "--model", "models:/x/1"])
        store.shutdown()
    ((command, environment),) = served
    assert command[:5] == ["mlflow", "models", "serve", "-m", "models:/x/1"] and "hunter2" not in " ".join(command)
    assert environment["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{store.server_port}"
    assert (environment["MLFLOW_TRACKING_USERNAME"], environment["MLFLOW_TRACKING_PASSWORD"]) == (
        "someone",
        "hunter2-secret",
    )
    assert heard == [f"Basic {base64.b64encode(b'someone:hunter2-secret').decode()}"]  # the credentials still reach it


def test_make_predict_names_the_version_it_uses_when_the_workspace_adapter_is_none(
    registered: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tools import predict

    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: SimpleNamespace(predict=None))
    adapter = Path("models/adapter/adapter_model.safetensors")
    adapter.parent.mkdir(parents=True)
    adapter.write_bytes(b"weights no evaluate registered: its registration failed")
    models.main(["promote", "1"])
    assert predict.load_model(None, [])[1] == f"models:/{NAME}@champion"
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warning.startswith(f"models/adapter is no version of {NAME}") and "make register" in warning, warning
    assert warning.endswith(f"using models:/{NAME}@champion, version 1"), warning
    mlflow.MlflowClient().set_model_version_tag(NAME, "2", "adapter_sha256", sha256(adapter))  # registered after all
    caplog.clear()
    predict.load_model(None, [])
    assert not [record for record in caplog.records if record.levelname == "WARNING"]


def test_the_workspace_adapter_is_the_pipelines() -> None:
    assert models.WORKSPACE_ADAPTER == Path(pipeline_paths(REPO / "dvc.yaml")["adapter_dir"])
