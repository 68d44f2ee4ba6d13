"""The registered model over HTTP, as `mlflow models serve` serves it: every input format MLflow documents for a binary
column gives the probabilities `make predict` gives, a bad row is refused in strict JSON and a bad request without a
traceback, the guide's curl line works as written, benign/malignant follows the malignant probability, and an image
unlike BreakHis's is classified with a warning. The tiny model and a random adapter, registered once for the module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import requests
from matplotlib import cbook
from PIL import Image
from repo_params import params, write_params

from medgemma_breakhis.download.sources import render_image
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS
from medgemma_breakhis.registry.model import decode_image, register_adapter
from tools import predict

# its module-scoped fixture is built once: `make test` hands these tests to one worker
pytestmark = pytest.mark.xdist_group("served")

REPO = Path(__file__).resolve().parents[1]
NAME = "breakhis-serving-test"
RAW_PARAMS = {"model": {"id": "tiny-gemma3"}, "eval": {"precision": "fp32"}, "registry": {"model_name": NAME}}
GUIDE = (REPO / "docs" / "model-registry.md").read_text(encoding="utf-8")
JSON = "application/json"


def synthetic(label: int, seed: int = 0) -> Image.Image:
    """A BreakHis-like image as the synthetic data set draws it (700x460, the stain of class `label`)."""
    return render_image(label, np.random.default_rng([seed, label]).normal(0, 8, 3), np.random.default_rng(seed))


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


# What a user sends: BreakHis-like images (PNG and JPEG), a photograph of a person, a grayscale field of view.
IMAGES = {
    **{f"slide-{label + 1}.png": encoded(synthetic(label), "PNG") for label in range(8)},
    "slide.jpg": encoded(synthetic(4, seed=1), "JPEG"),
    "person.jpg": Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes(),
    "grayscale.png": encoded(synthetic(1).convert("L"), "PNG"),
}
UNUSUAL = {"person.jpg", "grayscale.png"}


@dataclass
class Served:
    url: str
    folder: Path
    predicted: pd.DataFrame  # `make predict`'s CSV of IMAGES, by file name
    stderr: str  # what `make predict` wrote on stderr
    pid: int  # the server's process (`mlflow models serve`, which starts uvicorn)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_adapter: Path, tiny_model, stage_env: dict[str, str]
) -> Iterator[Served]:
    """A version registered from the tiny adapter, classified by `make predict` (tools/predict.py) and served by
    `mlflow models serve --env-manager local` on a free port of 127.0.0.1."""
    folder = tmp_path_factory.mktemp("serving")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "new").mkdir()
    for name, data in IMAGES.items():
        (folder / "new" / name).write_bytes(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in [name for name in os.environ if name.startswith(("MLFLOW_", "DVC_"))]:
            patch.delenv(name)
        patch.setenv("MLFLOW_TRACKING_URI", store)
        write_params(folder, RAW_PARAMS)
        origin = {"dvc_exp_name": "workspace", "git_commit": "0" * 40, "git_dirty": "false"}
        with mlflow.start_run(tags=origin) as run:
            pass
        register_adapter(run.info.run_id, tiny_adapter, params(RAW_PARAMS), tiny_model[2], "md5", {})
        uri = f"models:/{NAME}/1"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            predict.main([str(folder / "new"), "--model", uri, "--out", str(folder / "predicted.csv")])
        predicted = pd.read_csv(folder / "predicted.csv", keep_default_na=False)
        predicted.index = predicted["file"].map(lambda file: Path(file).name)
        port, log = free_port(), folder / "server.log"  # a file: a pipe nobody reads could fill and stop the server
        with log.open("w") as output:
            server = subprocess.Popen(
                [Path(sys.executable).parent / "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
                + ["-h", "127.0.0.1", "-p", str(port)],
                # uvicorn from PATH, as under make (whose PATH starts with .venv/bin)
                env=stage_env
                | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{stage_env['PATH']}"}
                | {"MLFLOW_TRACKING_URI": store},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the model server did not answer /ping in 120 s"
                with contextlib.suppress(requests.ConnectionError):
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                        break
                time.sleep(0.5)
            yield Served(f"http://127.0.0.1:{port}", folder, predicted, stderr.getvalue(), server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)


def strict_json(text: str) -> object:
    """`text` parsed as JSON the way JavaScript's JSON.parse does: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def as_base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def payload(form: str, images: list[str]) -> dict[str, object]:
    """The JSON of each format MLflow's scoring server takes, for base64 texts `images`."""
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}},
        "dataframe_records": {"dataframe_records": [{"image": image} for image in images]},
        "instances": {"instances": [{"image": image} for image in images]},
        "instances (values)": {"instances": images},
        "inputs": {"inputs": {"image": images}},
        "inputs (values)": {"inputs": images},
        "inputs (base64 in lines)": {"inputs": {"image": images}},
    }[form]


def post(served: Served, form: str, images: list[str]) -> requests.Response:
    if form == "csv":  # a CSV carries base64 text as is: no quote, comma or line break in it
        body = "image\n" + "".join(f"{image}\n" for image in images)
        return requests.post(f"{served.url}/invocations", data=body, headers={"Content-Type": "text/csv"}, timeout=60)
    return requests.post(f"{served.url}/invocations", json=payload(form, images), timeout=60)


def rows(response: requests.Response) -> pd.DataFrame:
    """The rows of an answer, which must be JSON that any parser reads."""
    assert response.status_code == 200, response.text
    return pd.DataFrame(strict_json(response.text)["predictions"])


@pytest.mark.slow  # a model server in a subprocess
@pytest.mark.parametrize(
    "form",
    [
        *("dataframe_split", "dataframe_records", "instances", "instances (values)", "inputs", "inputs (values)"),
        *("inputs (base64 in lines)", "csv"),
    ],
)
def test_every_input_format_gives_the_probabilities_predict_gives(served: Served, form: str) -> None:
    names = list(IMAGES)
    encode = base64.encodebytes if "lines" in form else base64.b64encode  # lines: as MLflow's own client sends bytes
    response = post(served, form, [encode(IMAGES[name]).decode() for name in names])
    assert response.status_code == 200, response.text
    answer, expected = pd.DataFrame(response.json()["predictions"]), served.predicted.loc[names]
    assert list(answer["error"]) == [""] * len(names)
    np.testing.assert_allclose(
        answer[PROBABILITY_COLUMNS].to_numpy(float), expected[PROBABILITY_COLUMNS].to_numpy(float), atol=1e-5
    )
    for column in ("predicted_class", "predicted_binary", "warning"):
        assert list(answer[column]) == list(expected[column]), column


@pytest.mark.slow  # a model server in a subprocess
@pytest.mark.parametrize("form", ["dataframe_records", "instances", "inputs", "csv"])
def test_a_bad_row_gets_its_error_and_nulls_in_strict_json_and_the_others_are_classified(
    served: Served, form: str
) -> None:
    sent = [as_base64(IMAGES["slide-1.png"]), as_base64(b"not an image")]
    sent += [] if form.startswith("dataframe_") else ["not base64 at all"]  # MLflow refuses those requests itself
    answer = rows(post(served, form, sent))
    assert answer["error"][0] == "" and answer["prob_benign_adenosis"][0] is not None
    for row in range(1, len(sent)):
        assert answer["error"][row].startswith("not an image"), answer["error"][row]
        assert answer.loc[row, [*PROBABILITY_COLUMNS, "malignant_probability", "predicted_class"]].isna().all()


@pytest.mark.slow  # a model server in a subprocess
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param("{not json", JSON, id="not JSON"),
        pytest.param(json.dumps({"dataframe_records": [{"picture": "aGVsbG8="}]}), JSON, id="no image column"),
        pytest.param(json.dumps({"dataframe_records": [{"image": None}]}), JSON, id="a null image"),
        pytest.param(json.dumps({"dataframe_records": [{"image": "not base64"}]}), JSON, id="dataframe, not base64"),
        pytest.param(json.dumps({"dataframe_split": {"data": [["aGVsbG8="]]}}), JSON, id="dataframe_split, no columns"),
        pytest.param("picture\naGVsbG8=\n", "text/csv", id="CSV, no image column"),
        pytest.param(
            'image\n"unterminated\n',
            "text/csv",
            id="CSV that does not parse",
            marks=pytest.mark.xfail(strict=True, reason="MLflow's CSV parser puts its traceback in its error"),
        ),
    ],
)
def test_a_request_that_cannot_be_read_is_refused_in_json_without_a_traceback(
    served: Served, body: str, content_type: str
) -> None:
    response = requests.post(f"{served.url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert 400 <= response.status_code < 500
    assert "Traceback" not in response.text and "stack_trace" not in response.text
    assert str(REPO) not in response.text and "site-packages" not in response.text


def guide_curl_command() -> str:
    """The command of the curl example in the guide's "Serve" section, as written there."""
    section = GUIDE.split("\n## Serve\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"^(?:.*[|\\]\n)*.*\bcurl\b.*$", section, flags=re.MULTILINE)  # with the lines it continues
    assert match, "the Serve section of docs/model-registry.md has no curl example"
    return match.group(0)


@pytest.mark.slow  # a model server in a subprocess
def test_the_curl_example_of_the_guide_works_as_written(served: Served) -> None:
    command = guide_curl_command()
    assert "127.0.0.1:5001" in command  # `make serve`'s address; here the test server's
    command = command.replace("127.0.0.1:5001", served.url.removeprefix("http://"))
    result = subprocess.run(
        ["bash", "-c", command], check=False, cwd=served.folder, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    (answer,) = strict_json(result.stdout)["predictions"]
    expected = served.predicted.loc["slide-1.png"]
    np.testing.assert_allclose([answer[c] for c in PROBABILITY_COLUMNS], expected[PROBABILITY_COLUMNS].astype(float))
    assert answer["predicted_binary"] == expected["predicted_binary"] and answer["error"] == ""


@pytest.mark.slow  # a model server in a subprocess
def test_benign_or_malignant_follows_the_malignant_probability_not_the_top_class(served: Served) -> None:
    answer = rows(post(served, "dataframe_records", [as_base64(data) for data in IMAGES.values()]))
    for table in (answer, served.predicted):
        malignant = table["malignant_probability"].astype(float) >= 0.5
        assert list(table["predicted_binary"]) == ["malignant" if m else "benign" for m in malignant]
    top_side = served.predicted["predicted_class"].str.split("_").str[0]
    # the tiny model's answers are near chance: some images' top class is on the other side than their sum
    assert (top_side != served.predicted["predicted_binary"]).any()


@pytest.mark.slow  # a model server in a subprocess
def test_an_image_unlike_breakhis_is_classified_with_a_warning(served: Served) -> None:
    predicted = served.predicted
    assert set(predicted.index[predicted["warning"] != ""]) == UNUSUAL
    assert (predicted["error"] == "").all()  # classified all the same
    assert "mostly dark" in predicted.loc["person.jpg", "warning"]
    assert "grayscale" in predicted.loc["grayscale.png", "warning"]
    warned = re.findall(r"^warning (\S+): unlike", served.stderr, flags=re.MULTILINE)
    assert sorted(Path(file).name for file in warned) == sorted(UNUSUAL)


@pytest.mark.parametrize("label", range(8))
def test_breakhis_like_images_get_no_warning_and_others_do(label: int) -> None:
    for seed in range(3):
        assert decode_image(encoded(synthetic(label, seed), "PNG"))[1] == ""
    assert decode_image(encoded(synthetic(label).convert("L"), "PNG"))[1].startswith("unlike")
    assert "RGBA pixels" in decode_image(encoded(synthetic(label).convert("RGBA"), "PNG"))[1]
    assert "2100x1380 pixels" in decode_image(encoded(synthetic(label).resize((2100, 1380)), "PNG"))[1]
    assert "mostly dark" in decode_image(IMAGES["person.jpg"])[1]


@pytest.mark.slow  # the module's registered version, to compare with
def test_predict_with_the_workspace_adapter_answers_as_its_registered_version(
    served: Served, tiny_adapter: Path
) -> None:
    out = served.folder / "from-adapter.csv"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(served.folder)  # its params.yaml: the tiny model in fp32, as registered
        predict.main([str(served.folder / "new"), "--model", str(tiny_adapter), "--out", str(out)])
    results = pd.read_csv(out, keep_default_na=False)
    expected = served.predicted.loc[results["file"].map(lambda file: Path(file).name)]
    np.testing.assert_allclose(results[PROBABILITY_COLUMNS], expected[PROBABILITY_COLUMNS], atol=1e-5)
    assert list(results["warning"]) == list(expected["warning"])


def resident_bytes(pid: int) -> int:
    """The resident memory of process `pid` and its children, summed."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(process.memory_info().rss for process in tree if process.is_running())


@pytest.mark.slow  # a model server in a subprocess, and eight 40-megapixel images
def test_eight_40_megapixel_images_in_one_request_keep_the_server_under_3_gb(served: Served) -> None:
    large = Image.effect_mandelbrot((7300, 5479), (-2, -1.25, 0.75, 1.25), 20).convert("RGB")  # 40 megapixels
    image = base64.b64encode(encoded(large, "PNG")).decode()
    before, peak, done = resident_bytes(served.pid), [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], resident_bytes(served.pid))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = post(served, "inputs", [image] * 8)
    finally:
        done.set()
        watcher.join()
    answer = rows(response)
    assert list(answer["error"]) == [""] * 8 and answer["warning"].str.contains("7300x5479 pixels").all()
    print(
        f"request of {len(image) * 8 / 1e6:.1f} MB: server {before / 2**30:.2f} GiB before, peak {peak[0] / 2**30:.2f} GiB"
    )
    assert peak[0] < 3 * 2**30, f"peak resident memory {peak[0] / 2**30:.2f} GiB"
