"""From evaluated adapter to registered model: `evaluate` registers a version with its origin and metrics, an alias
promotes and rolls it back, `make predict` classifies new images with it (bad ones refused one by one), and
`mlflow models serve` answers with the same probabilities. The tiny model and a random adapter, in one MLflow store
shared by the module."""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image
from repo_params import params, write_params

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.evaluate.evaluation import run_evaluation
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS as LABEL_COLUMNS
from medgemma_breakhis.registry import model as registry_model
from medgemma_breakhis.registry.model import SERVING_DISTRIBUTIONS, decode_image, register_adapter
from medgemma_breakhis.track.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, EXPERIMENT_NAME, experiment_id
from tools import models, predict

# its module-scoped fixture is built once: `make test` hands these tests to one worker
pytestmark = pytest.mark.xdist_group("registered")

REPO = Path(__file__).resolve().parents[1]
NAME = "breakhis-test"
RAW_PARAMS = {
    "model": {"id": "tiny-gemma3"},
    "eval": {"precision": "fp32", "bootstrap_resamples": 100},  # fp32: comparisons to 1e-5
    "registry": {"model_name": NAME},
}


@dataclass
class Registered:
    folder: Path
    store: str
    predictions: pd.DataFrame  # evaluate's per-image predictions, by file name
    images: list[Path]


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def evaluate(folder: Path, synthetic_root: Path, split_dir: Path, adapter: Path) -> None:
    run_evaluation(
        params(RAW_PARAMS),
        "evaluate",
        image_root=synthetic_root,
        test_csv=split_dir / "test.csv",
        metrics_path=folder / "metrics" / "finetuned.json",
        predictions_path=folder / "predictions" / "finetuned.csv",
        roc_path=folder / "plots" / "roc_finetuned.csv",
        adapter_dir=adapter,
        register=register_adapter,
    )


@pytest.fixture(scope="module")
def registered(
    tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, split_dir: Path, tiny_adapter: Path
) -> Iterator[Registered]:
    """`evaluate` run once with registration, in a folder of its own (params.yaml, MLflow store) as the working one."""
    folder = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in [name for name in os.environ if name.startswith(("MLFLOW_", "DVC_"))]:
            patch.delenv(name)
        patch.setenv("MLFLOW_TRACKING_URI", store)
        write_params(folder, RAW_PARAMS)
        evaluate(folder, synthetic_root, split_dir, tiny_adapter)
        predictions = pd.read_csv(folder / "predictions" / "finetuned.csv")
        images = [synthetic_root / f for f in predictions["filename"][:3]]
        yield Registered(
            folder, store, predictions.set_index(predictions["filename"].map(lambda f: Path(f).name)), images
        )


@pytest.mark.slow  # the module's `evaluate`, which registers
def test_evaluate_registers_a_version_with_its_origin_metrics_and_adapter_but_no_base_weights(
    registered: Registered, tiny_adapter: Path
) -> None:
    client = mlflow.MlflowClient(registered.store)
    version = client.get_model_version(NAME, "1")  # the fixture's `evaluate`; a later test registers a second
    run = client.get_run(version.run_id)
    assert run.data.tags["stage"] == "evaluate"
    assert {"dvc_exp_name": "workspace", "base_model_id": "tiny-gemma3"}.items() <= version.tags.items()
    assert version.tags["git_commit"] == run.data.tags["git_commit"]
    assert version.tags["adapter_dvc_md5"].startswith("not in a dvc.lock")
    assert version.tags["base_model_resolved_revision"] == run.data.tags["model_resolved_revision"]
    metrics = json.loads((registered.folder / "metrics" / "finetuned.json").read_text())
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    linked = {metric.key: metric.value for metric in logged.metrics}
    assert (
        linked["eight_class_accuracy"] == metrics["eight_class"]["accuracy"] == run.data.metrics["eight_class_accuracy"]
    )
    assert linked["binary_roc_auc"] == metrics["binary"]["roc_auc"]
    assert logged.params["lora.r"] == "8" and logged.params["registry.model_name"] == NAME
    assert "8-class accuracy" in version.description
    eight_class = metrics["eight_class"]
    assert version.tags["metric.eight_class_accuracy"] == (
        f"{eight_class['accuracy']:.3f} [{eight_class['accuracy_ci95_low']:.3f}, {eight_class['accuracy_ci95_high']:.3f}]"
    )
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.signature.inputs.input_names() == ["image"] and info.saved_input_example_info is not None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"))
    adapter_files = {p.name for p in tiny_adapter.iterdir()}
    (copied,) = (local / "artifacts").iterdir()  # the adapter folder, under its own name
    assert {p.name for p in copied.iterdir()} == adapter_files
    weights = [p for p in local.rglob("*.safetensors")]
    assert [p.name for p in weights] == ["adapter_model.safetensors"], "the base model's weights must not be copied"
    # the code it runs when served: the package as it was, without compiled files
    code = local / "code" / "medgemma_breakhis"
    assert (code / "registry" / "model.py").read_text() == (
        REPO / "medgemma_breakhis" / "registry" / "model.py"
    ).read_text()
    assert not list(code.rglob("__pycache__"))
    assert "roc_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # the module's `evaluate`, which registers
def test_a_promoted_version_classifies_new_images_as_evaluate_scored_them(
    registered: Registered, capsys: pytest.CaptureFixture[str]
) -> None:
    models.main(["promote", "1"])
    assert f"{NAME}@champion is version 1" in capsys.readouterr().out
    out = registered.folder / "new.csv"
    predict.main([*map(str, registered.images), "--out", str(out)])  # the default: the version @champion
    printed = capsys.readouterr().out
    assert "3 image(s) classified with models:/breakhis-test@champion, 0 refused" in printed
    assert printed.count("Research use only") == 1
    results = pd.read_csv(out, keep_default_na=False)
    expected = registered.predictions.loc[[p.name for p in registered.images], LABEL_COLUMNS].to_numpy()
    np.testing.assert_allclose(results[PROBABILITY_COLUMNS].to_numpy(float), expected, atol=1e-5)
    assert list(results["predicted_class"]) == list(
        registered.predictions.loc[[p.name for p in registered.images], "predicted_class"]
    )
    assert set(results["predicted_binary"]) <= {"benign", "malignant"} and set(results["error"]) == {""}


@pytest.mark.slow  # the module's `evaluate`, which registers
def test_versions_are_listed_newest_first_and_an_alias_rolls_back(
    registered: Registered, capsys: pytest.CaptureFixture[str]
) -> None:
    client = mlflow.MlflowClient(registered.store)
    (first,) = client.search_model_versions(f"name = '{NAME}'")
    mlflow.register_model(first.source, NAME)  # as the next `evaluate` would, without scoring again
    models.main(["list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[2:]] == ["2", "1"]
    assert " workspace " in listed[3] and "n/a" not in listed[3]  # version 1's DVC experiment and metrics
    models.main(["promote", "1"])  # its own starting point: other tests of the module may run in another worker
    capsys.readouterr()
    models.main(["promote", "2"])
    assert "version 1 -> 2 (to roll back: make promote VERSION=1 ALIAS=champion)" in capsys.readouterr().out
    models.main(["promote", "1"])
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    with pytest.raises(models.ModelNotFound, match="has no version '9'; its versions: 2, 1"):
        models.main(["promote", "9"])


@pytest.mark.slow  # the module's `evaluate`, which registers
def test_bad_inputs_are_refused_one_line_each_and_the_rest_classified(
    registered: Registered, tiny_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = registered.folder / "inputs"
    (folder / "empty").mkdir(parents=True)
    good = registered.images[0].read_bytes()
    files = {
        "good.png": good,
        "notes.png": b"a text file named like an image",
        "corrupt.png": good[:100] + bytes(len(good) - 200) + good[-100:],  # a valid header, zeroed image data
        "truncated.png": good[: len(good) // 2],
        "tiny.png": png((1, 1)),
        "huge.png": png((20_000, 20_000), mode="1"),  # 1 bit per pixel: 50 MB to build, a few kB on disk
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = registered.folder / "mixed.csv"
    with pytest.raises(SystemExit) as exited:
        predict.main(
            [
                str(folder / "good.png"),
                str(folder),
                str(folder / "empty"),
                str(folder / "missing.png"),
                "--out",
                str(out),
            ]
        )
    assert exited.value.code == predict.REFUSED_EXIT_STATUS
    refused = [line for line in capsys.readouterr().err.splitlines() if line.startswith("refused ")]
    results = pd.read_csv(out, keep_default_na=False).set_index("file")
    assert len(refused) == len(results[results["error"] != ""]) == 7  # 5 bad files, an empty folder, a missing file
    reasons = {Path(file).name: error for file, error in results["error"].items() if error}
    assert reasons["notes.png"].startswith("not an image")
    assert reasons["corrupt.png"].startswith("corrupt or truncated")
    assert reasons["truncated.png"].startswith("corrupt or truncated")
    assert "1x1 pixels is smaller than 32x32" in reasons["tiny.png"]
    assert reasons["huge.png"].startswith("refused before decoding")
    assert reasons["empty"].startswith("folder holds no image files")
    assert reasons["missing.png"] == "no such file or folder"
    classified = results[results["error"] == ""]
    assert len(classified) == 2  # good.png named, and found again in the folder
    np.testing.assert_allclose(classified[PROBABILITY_COLUMNS].astype(float).sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (png((40_000, 2_000), mode="1"), "pixels is more than 40,000,000"),  # under PIL's bomb limit: ours refuses
        (png((64, 16)), "64x16 pixels is smaller than 32x32"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image in a format read here"),  # never handed to Ghostscript
    ],
)
def test_images_are_refused_from_their_header(data: bytes, reason: str) -> None:
    with pytest.raises(DataError, match=reason):
        decode_image(data)


@pytest.mark.slow  # an `evaluate` of its own
def test_a_failed_registration_is_recorded_with_the_command_that_tries_again(
    stage_folder: Path, synthetic_root: Path, split_dir: Path, tiny_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def store_gone(*args: object) -> None:
        raise OSError("the store went away")

    write_params(stage_folder, RAW_PARAMS)
    run_evaluation(
        params(RAW_PARAMS),
        "evaluate",
        image_root=synthetic_root,
        test_csv=split_dir / "test.csv",
        metrics_path=stage_folder / "metrics" / "finetuned.json",
        predictions_path=stage_folder / "predictions" / "finetuned.csv",
        roc_path=stage_folder / "plots" / "roc_finetuned.csv",
        adapter_dir=tiny_adapter,
        register=store_gone,
    )
    (failed,) = json.loads((stage_folder / "metrics" / "finetuned.untracked.json").read_text())["not_tracked"]
    assert (
        failed
        == f"the model version of {NAME} and its metrics (`make register` tries again): OSError: the store went away"
    )
    assert "`make register` tries again" in caplog.text  # the warning of the run


def test_a_16_bit_gray_image_is_scaled_to_8_bits_not_clipped_to_white() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((460, 700), 30_000, dtype=np.uint16)).save(buffer, format="PNG")
    image, warning = decode_image(buffer.getvalue())
    assert image.getpixel((0, 0)) == (116, 116, 116)  # 30000 / 257, where convert("RGB") gives 255
    assert "I;16 pixels" in warning and "grayscale" in warning


def test_a_multi_page_file_is_classified_on_its_first_page_with_a_warning() -> None:
    buffer = io.BytesIO()
    pages = [Image.new("RGB", (700, 460), colour) for colour in ((230, 200, 215), (20, 20, 20), (0, 0, 255))]
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    image, warning = decode_image(buffer.getvalue())
    assert image.getpixel((0, 0)) == (230, 200, 215) and warning == "3 pages or frames: classified on the first"


def test_floating_point_pixels_are_refused() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((460, 700), 0.5, dtype=np.float32)).save(buffer, format="TIFF")
    with pytest.raises(DataError, match="floating-point pixels"):
        decode_image(buffer.getvalue())


@pytest.mark.slow  # a 40-megapixel image, encoded and resized
def test_an_image_is_decoded_to_no_more_than_the_model_input_as_the_processor_would_resize_it(tiny_model) -> None:
    _, processor, _ = tiny_model
    size = processor.image_processor.size
    large = Image.effect_mandelbrot((7300, 5479), (-2, -1.25, 0.75, 1.25), 20).convert("RGB")  # 40 megapixels
    buffer = io.BytesIO()
    large.save(buffer, format="PNG")
    small, warning = decode_image(buffer.getvalue(), (size.width, size.height))
    assert small.size == (size.width, size.height) and "7300x5479 pixels" in warning  # the warning: its own size
    resized = processor.image_processor(large, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(processor.image_processor(small, return_tensors="np")["pixel_values"], resized)
    jpeg = io.BytesIO()
    large.save(jpeg, format="JPEG")
    assert decode_image(jpeg.getvalue(), (size.width, size.height))[0].size == (size.width, size.height)


def test_a_request_over_the_limit_is_refused_whole_in_one_error(tiny_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor, _ = tiny_model
    monkeypatch.setattr(registry_model, "MAX_REQUEST_BYTES", 2**20)
    images = pd.DataFrame({"image": [png((700, 460)), base64.b64encode(bytes(2**20)).decode()]})
    with pytest.raises(mlflow.MlflowException, match=r"1 MiB of images in one request: at most 1 MiB") as refused:
        registry_model.classify(model, processor, images, batch_size=2)
    assert refused.value.get_http_status_code() == 400 and "\n" not in refused.value.message


@pytest.mark.slow  # the module's `evaluate`, which registers
def test_the_experiment_opens_as_model_training_and_a_kind_set_by_hand_is_kept(registered: Registered) -> None:
    client = mlflow.MlflowClient(registered.store)
    created = client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.delete_experiment_tag(created, EXPERIMENT_KIND_TAG)  # an experiment made before this tag existed
    experiment_id()
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.set_experiment_tag(created, EXPERIMENT_KIND_TAG, "genai_development")
    experiment_id()
    assert client.get_experiment(created).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    client.set_experiment_tag(created, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    # MLflow 3.17's UI picks its view by its own switch, which the link of `make mlflow-ui` sets
    assert models.training_view_url("http://127.0.0.1:5000/") == (
        f"http://127.0.0.1:5000/#/experiments/{created}?workflowType=machine_learning"
    )


def third_party_imports(path: Path, seen: set[Path]) -> set[str]:
    """Top-level names of the libraries `path` and the package modules it imports (transitively) import."""
    seen.add(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top == "medgemma_breakhis":
                module = REPO.joinpath(*name.split(".")).with_suffix(".py")
                if module.is_file() and module not in seen:
                    found |= third_party_imports(module, seen)
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def test_the_registered_requirements_cover_every_library_the_classifier_imports() -> None:
    distributions = importlib.metadata.packages_distributions()
    pinned = {name.lower() for name in SERVING_DISTRIBUTIONS}
    imported = third_party_imports(REPO / "medgemma_breakhis" / "registry" / "model.py", set())
    unpinned = {name for name in imported if not {d.lower() for d in distributions[name]} & pinned}
    assert not unpinned, f"imported by the registered model's code, not in registry.SERVING_DISTRIBUTIONS: {unpinned}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # a model server in a subprocess
def test_the_served_model_answers_with_the_probabilities_predict_gives(
    registered: Registered, stage_env: dict[str, str]
) -> None:
    port = free_port()
    uri = f"models:/{NAME}/1"
    server = subprocess.Popen(
        # `make serve`: `mlflow models serve -m <uri> --env-manager local -h 127.0.0.1 -p <port>`
        [sys.executable, "-m", "tools.models", "serve", "--model", uri, "--port", str(port)],
        cwd=registered.folder,
        # mlflow and uvicorn from PATH, as under make (whose PATH starts with .venv/bin)
        env=stage_env
        | {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{stage_env['PATH']}",
            "MLFLOW_TRACKING_URI": registered.store,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        images = [path.read_bytes() for path in registered.images] + [b"not an image"]
        payload = {"dataframe_records": [{"image": base64.b64encode(data).decode()} for data in images]}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        served = pd.DataFrame(response.json()["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    in_process = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": images}))
    np.testing.assert_allclose(
        served[PROBABILITY_COLUMNS][:3].to_numpy(float), in_process[PROBABILITY_COLUMNS][:3].to_numpy(float), atol=1e-5
    )
    assert list(served["predicted_class"][:3]) == list(in_process["predicted_class"][:3])
    assert served["error"][3].startswith("not an image") and served[PROBABILITY_COLUMNS[0]].isna()[3]


@pytest.mark.slow  # `evaluate` again on the module's registered adapter
def test_an_adapter_registered_before_gets_no_second_version_and_its_new_metrics_are_linked(
    registered: Registered, synthetic_root: Path, split_dir: Path, tiny_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = mlflow.MlflowClient(registered.store)
    before = {version.version for version in client.search_model_versions(f"name = '{NAME}'")}
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.INFO):
        patch.chdir(registered.folder)
        patch.setenv("MLFLOW_TRACKING_URI", registered.store)
        evaluate(registered.folder, synthetic_root, split_dir, tiny_adapter)
    assert {version.version for version in client.search_model_versions(f"name = '{NAME}'")} == before
    assert f"is version 1 of {NAME} already: its new metrics are linked" in caplog.text
    linked = client.get_logged_model(client.get_model_version(NAME, "1").source.removeprefix("models:/")).metrics
    assert len({metric.run_id for metric in linked}) == 2  # the first evaluation's and this one's
