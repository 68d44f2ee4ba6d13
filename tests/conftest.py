"""Shared fixtures: a small synthetic dataset, tiny models (one that overflows in fp16, one with Gemma 3's real
vocabulary), MedGemma's processor, all built locally."""

from __future__ import annotations

import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from repo_params import params

from medgemma_breakhis.data.breakhis import FOLDS_CSV

# torch, transformers, peft, mlflow and the modules that import them are imported by the fixtures that use them: a
# parallel run's controller (`pytest -n`, which runs no test) then starts in a second instead of competing with its
# workers for the CPU while they import them.


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process stages see the hub as the subprocesses do (HF_HUB_OFFLINE=1): no test reaches the network; a test
    of the hub check turns it back on."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: the env var is too late


@pytest.fixture(autouse=True)
def _mlflow_environment_restored() -> Iterator[None]:
    """A stage sets MLflow's variables in its own process (`tracking.bound_store_requests`); a test that runs one
    in-process leaves them as they were for the next."""
    import mlflow

    from medgemma_breakhis.track.store import STORE_REQUEST_POLICY

    names = (*STORE_REQUEST_POLICY, "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {name: os.environ.get(name) for name in names}
    yield
    mlflow.set_tracking_uri(None)  # nor the tracking URI a stage set in this process, which outranks the variable
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


REPOSITORY = Path(__file__).resolve().parents[1]
_TREE = pytest.StashKey[set[str]]()


def _tree() -> set[str]:
    """What git sees in the working tree, ignored files included, but for Python's and the tools' caches."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=REPOSITORY, capture_output=True, text=True, check=True
    )
    return {line for line in status.stdout.splitlines() if "__pycache__" not in line and "_cache/" not in line}


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller of an xdist run, or a run without it
        session.config.stash[_TREE] = _tree()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests work in temporary folders: the suite fails if it left anything in the repository."""
    if hasattr(session.config, "workerinput") or _TREE not in session.config.stash:
        return
    left = sorted(_tree() - session.config.stash[_TREE])
    if left:
        session.config.get_terminal_writer().line(
            "the tests left these in the repository (git status --ignored):\n  " + "\n  ".join(left), red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order `make test`'s workers take tests in (`--dist loadgroup`, an `xdist_group` at a time), the longest
    kinds first so that no worker is left with a long one at the end: one end-to-end test, which builds the reproduced
    repository (`repo`) the others copy; the other slow tests while it builds; the other end-to-end tests; the unit
    tests last, filling the gaps. Within each kind an `xdist_group` comes first: one worker runs it whole, its costly
    fixture and all (a fresh clone's run once ended on `generate_experiment` alone)."""
    kinds: dict[str, list[pytest.Item]] = {"e2e": [], "slow": [], "unit": []}
    for item in sorted(items, key=lambda item: item.get_closest_marker("xdist_group") is None):
        kinds[next((kind for kind in ("e2e", "slow") if item.get_closest_marker(kind)), "unit")].append(item)
    items[:] = kinds["e2e"][:1] + kinds["slow"] + kinds["e2e"][1:] + kinds["unit"]


def built_once(
    tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str, build: Callable[[Path], object]
) -> Path:
    """`build(folder)` once per test run, by whichever worker of a parallel run (pytest-xdist) needs the folder first,
    while the others wait for it; the folder, which the tests that share it only read."""
    from filelock import FileLock

    # the workers' temporary folders share this parent, the one place all of them see
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    built, done = shared / name, shared / f"{name}.done"
    with FileLock(shared / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(built, ignore_errors=True)  # what a worker whose build failed left behind
            built.mkdir()
            build(built)
            done.touch()
    return built


def _synthetic_breakhis(**synthetic: object) -> Callable[[Path], object]:
    from medgemma_breakhis.download.sources import generate_synthetic_breakhis

    return partial(generate_synthetic_breakhis, spec=params({"data": {"synthetic": synthetic}}).data.synthetic)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A small synthetic BreakHis copy (two images per benign patient and magnification, three per malignant)."""
    return built_once(tmp_path_factory, worker_id, "breakhis", _synthetic_breakhis(images_per_patient=2))


@pytest.fixture(scope="session")
def synthetic_root_100x(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The 100X part of `synthetic_root` (the same images), for tests that read every image: a quarter of the work."""
    build = _synthetic_breakhis(images_per_patient=2, magnifications=[100])
    return built_once(tmp_path_factory, worker_id, "breakhis-100x", build)


@pytest.fixture(scope="session")
def synthetic_folds(synthetic_root: Path) -> pd.DataFrame:
    return pd.read_csv(synthetic_root / FOLDS_CSV)


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """This project as a git repository, set to the offline profile, reproduced and committed (`dvc_cli`) for the
    end-to-end tests, built once per test run (`built_once`). Shared by the tests that only read it, in every worker
    at once: none may change it, nor run a command in it that could write (`dvc repro`, `git status`); those work on
    a copy (`copy_of`)."""
    from dvc_cli import reproduced_repository

    return built_once(tmp_path_factory, worker_id, "reproduced-repo", reproduced_repository)


def _new_store(folder: Path) -> None:
    """`folder`/mlflow.db, made by MLflow in a process of its own (its default experiment's artifacts: `folder`)."""
    code = "import mlflow; mlflow.MlflowClient('sqlite:///mlflow.db').search_experiments()"
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True)


@pytest.fixture(scope="session")
def blank_store(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """An MLflow sqlite store with its tables and nothing in them, which the stores of `workspace` and `stage_folder`
    start as copies of: MLflow's schema migrations take a second or two of CPU for each new store."""
    return built_once(tmp_path_factory, worker_id, "blank-store", _new_store) / "mlflow.db"


@pytest.fixture
def workspace(repo: Path, tmp_path: Path, blank_store: Path) -> Iterator[Path]:
    """A copy of the reproduced repository (`repo`) for one test to change; afterwards, checked for kept secrets."""
    from dvc_cli import assert_no_secret_kept, copy_of

    copy = copy_of(repo, tmp_path / "workspace")
    shutil.copyfile(blank_store, copy / "mlflow.db")
    yield copy
    assert_no_secret_kept(copy)


@pytest.fixture(scope="session")
def split_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default split (fold 1, 100X, binary balance) of the synthetic set: train.csv, test.csv, summary.json."""
    from medgemma_breakhis.data.split import write_split

    folder = tmp_path_factory.mktemp("split")
    write_split(synthetic_root / FOLDS_CSV, params().split, folder, folder / "summary.json")
    return folder


@pytest.fixture(scope="session")
def tiny_model():
    """(model, processor, info) of the tiny random Gemma 3, in fp32 so comparisons are exact."""
    from medgemma_breakhis.model.load import load_base_model

    return load_base_model(params({"model": {"id": "tiny-gemma3"}}).model, "fp32")


@pytest.fixture(scope="session")
def gemma3_tokenizer() -> Path:
    """The folder of Gemma 3's real tokenizer (`make tokenizer`); without it, the test is skipped with the reason."""
    from medgemma_breakhis.model.builtin import TokenizerMissing, verified_tokenizer_folder

    try:
        return verified_tokenizer_folder()
    except TokenizerMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def medgemma_processor(gemma3_tokenizer: Path):
    """MedGemma's processor: Gemma 3's tokenizer and chat template, 896x896 images as 256 image tokens."""
    from medgemma_breakhis.model.builtin import medgemma_processor

    return medgemma_processor()


@pytest.fixture(scope="session")
def real_vocabulary_model(medgemma_processor, tmp_path_factory: pytest.TempPathFactory):
    """(model, processor, info) of a tiny random Gemma 3 with MedGemma's processor (Gemma 3's 262,145-token vocabulary,
    896x896 images, 256 image tokens), saved and loaded back as a local folder, in fp32."""
    from medgemma_breakhis.model.builtin import build_tiny_gemma3
    from medgemma_breakhis.model.load import load_base_model

    folder = build_tiny_gemma3(tmp_path_factory.mktemp("real-vocabulary-gemma3"), medgemma_processor)
    return load_base_model(params({"model": {"id": str(folder)}}).model, "fp32")


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny model as `train` saves one (weights and processor), with random B matrices so that
    it changes the scores, without the cost of training it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medgemma_breakhis.model.load import load_base_model

    folder = tmp_path_factory.mktemp("adapter")
    model, processor, _ = load_base_model(params({"model": {"id": "tiny-gemma3"}}).model, "fp32")
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)  # not torch's global one: the same adapter in any order of tests
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_A" in name:  # as peft initialises it
                torch.nn.init.kaiming_uniform_(parameter, a=math.sqrt(5), generator=generator)
            elif "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    adapted.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# Scaling the first MLP's input projections makes its activations exceed float16's 65,504 while every weight stays
# well inside it (largest ~83): the way Gemma 3 overflows in fp16. bfloat16 and float32 stay finite.
ACTIVATION_SCALE = 1000.0


@pytest.fixture(scope="session")
def overflowing_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local copy of the tiny model whose activations overflow float16 (and only float16)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from medgemma_breakhis.model.builtin import build_tiny_gemma3

    folder = build_tiny_gemma3(tmp_path_factory.mktemp("overflowing-gemma3"))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    mlp = model.model.language_model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(ACTIVATION_SCALE)
        mlp.up_proj.weight.mul_(ACTIVATION_SCALE)
    assert max(p.abs().max().item() for p in model.parameters()) < torch.finfo(torch.float16).max / 100
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def train_argv(synthetic_root: Path) -> Callable[[Path | str], list[str]]:
    """The `train` stage's arguments for a training split over the synthetic images, the outputs placed as dvc.yaml
    places them, relative to the stage's working folder."""

    def argv(train_csv: Path | str) -> list[str]:
        return [
            *("--images", str(synthetic_root), "--train", str(train_csv)),
            *("--adapter", "models/adapter", "--metrics", "metrics/train.json", "--loss", "plots/train_loss.csv"),
            *("--checkpoints", "checkpoints"),
        ]

    return argv


@pytest.fixture(scope="session")
def stage_env() -> dict[str, str]:
    """The environment of a stage run as a subprocess: this repository importable, offline, and no MLflow or DVC
    setting inherited from the shell that runs the tests."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    return inherited | {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def stage_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blank_store: Path) -> Iterator[Path]:
    """`tmp_path` as the working folder of a stage called in-process (`stages.<name>.main([...])`), with its own MLflow
    store; the signal handlers the stage installs are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(blank_store, tmp_path / "mlflow.db")
    for name in [name for name in os.environ if name.startswith(("MLFLOW_", "DVC_"))]:
        monkeypatch.delenv(name)
    # Set, so that it is unset again afterwards: the stage exports the store it uses.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield tmp_path
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def _store_locked(db: Path, when: Callable[[], bool] | None = None) -> Iterator[threading.Event]:
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        while when is not None and not when():
            if release.wait(0.01):
                return
        connection = sqlite3.connect(db, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        taken.set()
        release.wait()
        connection.rollback()
        connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    if when is None:
        taken.wait(10)
    try:
        yield taken
    finally:
        release.set()
        thread.join()


@pytest.fixture
def lock_store() -> Callable[..., AbstractContextManager[threading.Event]]:
    """`with lock_store(db, when=None) as taken:` an exclusive lock on the sqlite file `db` from another connection,
    as a copy in progress or another writer would hold it: taken at once, or as soon as `when()` is true (`taken` is
    then set); released at the end of the block."""
    return _store_locked
