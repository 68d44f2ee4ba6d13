"""Classify new images with a fine-tuned adapter: class probabilities and predictions in a CSV and a short table
(docs/model-registry.md). Exit status 3 when any image was refused, 1 when nothing could run.
Run: make predict IMAGES='new/slide-1.png new/batch/' [MODEL=...] [OUT=reports/predictions.csv], or see --help."""

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlflow
import pandas as pd

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.files import atomic_write_text
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import add_override_argument, load_params
from medgemma_breakhis.core.stage import stage_entry
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS
from medgemma_breakhis.registry import model as classifier
from medgemma_breakhis.track.store import open_store
from tools.models import ModelNotFound, model_uri

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
CHUNK = 64  # files read and scored per call of the model (at most MAX_REQUEST_BYTES): never a whole folder at once
REFUSED_EXIT_STATUS = 3
SHOWN_ROWS = 20
# How every CSV of this tool starts (a file that does not is never overwritten), and its columns of text.
HEADER = ",".join(["file", *PROBABILITY_COLUMNS]).encode()
TEXT = ["file", "error", "warning"]
Predict = Callable[[pd.DataFrame], pd.DataFrame]
# MedGemma's intended use (its model card), in our words
CAVEAT = (
    "Research use only. MedGemma, and any adapter trained from it here, is a starting point for developers: its "
    "outputs are not validated for clinical use and must not inform a diagnosis or a patient's care without "
    "validation on your own data and use case."
)


def printable(text: str | Path) -> str:
    """`text` as a terminal shows it and UTF-8 holds it: undecodable bytes as \\xff, control characters as \\x1b."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in text)


def check_out(out: Path) -> None:
    """ExpectedError unless `out` can be written and holds nothing but an earlier CSV of this tool, if anything."""
    try:
        if out.exists():  # a folder fails here, as a file that cannot be opened
            with out.open("rb") as stream:
                if not stream.readline(len(HEADER) + 1).startswith(HEADER):
                    raise ExpectedError(f"OUT {printable(out)} is not a CSV of this tool: not overwritten")
        tempfile.TemporaryFile(dir=next(folder for folder in out.absolute().parents if folder.exists())).close()
    except OSError as err:
        raise ExpectedError(f"OUT {printable(out)} cannot be written: {err.strerror or err}") from None


def find_images(arguments: list[Path]) -> list[tuple[Path, str]]:
    """Each image file named (whatever its suffix) or found in a folder named, with ""; any other argument, why."""
    found = []
    for argument in arguments:
        if argument.is_dir():
            inside = sorted(path for path in argument.rglob("*") if path.is_file())
            images = [(path, "") for path in inside if path.suffix.lower() in IMAGE_SUFFIXES]
            if left := len(inside) - len(images):
                logger.info("%s: %d file(s) without an image suffix left out", printable(argument), left)
            found += images or [(argument, f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")]
        else:
            found.append((argument, "" if argument.is_file() else "no such file or folder"))
    return found


def read_bytes(path: Path) -> bytes | str:
    """The file's bytes, or why it cannot be read (refused by size before reading: more than one call takes)."""
    try:
        if (size := path.stat().st_size) > classifier.MAX_REQUEST_BYTES:
            return f"{size / 2**20:.0f} MiB is more than the {classifier.MAX_REQUEST_BYTES // 2**20} MiB read here"
        return path.read_bytes()
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"


def load_model(choice: str | None, params_overrides: list[str]) -> tuple[Predict, str]:
    """(the model's `predict(DataFrame)`, what it is) for `--model`: an adapter folder, else `models.model_uri`'s."""
    params = load_params(overrides=params_overrides)
    if choice is not None and Path(choice).is_dir():
        model, processor = classifier.load_adapter_model(Path(choice), params.model, params.eval.precision)
        predict = partial(classifier.classify, model, processor, batch_size=params.eval.batch_size)
        return predict, f"the adapter in {choice} on {params.model.id}"
    open_store()
    uri = model_uri(params.registry.model_name, choice)
    try:
        return mlflow.pyfunc.load_model(uri).predict, uri
    except mlflow.exceptions.MlflowException as err:
        raise ModelNotFound(f"cannot load model {uri}: {err.message}") from None


def classify_files(predict: Predict | None, found: list[tuple[Path, str]]) -> pd.DataFrame:
    """One row per path found (`file` and the model's output columns), in order, read and scored a chunk at a time."""
    tables, chunk = [], []
    for path, why in found:
        content = why or read_bytes(path)
        if len(chunk) == CHUNK or sum(len(row["error"]) for row in chunk) + len(content) > classifier.MAX_REQUEST_BYTES:
            tables.append(classify_chunk(predict, chunk))
            chunk = []
        chunk.append({"file": str(path), "error": content})
    return pd.concat([*tables, classify_chunk(predict, chunk)], ignore_index=True)


def classify_chunk(predict: Predict | None, chunk: list[dict[str, str | bytes]]) -> pd.DataFrame:
    """The rows of files with their bytes as `error`: a readable file's is then the model's, an unreadable one's why."""
    table = pd.DataFrame(chunk, columns=["file", *classifier.OUTPUT_COLUMNS], dtype=object)
    if readable := [i for i, row in enumerate(chunk) if isinstance(row["error"], bytes)]:
        predicted = predict(pd.DataFrame({classifier.IMAGE_COLUMN: [chunk[i]["error"] for i in readable]}))
        table.loc[readable, classifier.OUTPUT_COLUMNS] = predicted[classifier.OUTPUT_COLUMNS].to_numpy()
    return table


def summary(results: pd.DataFrame) -> str:
    """The classified images as a short table: file, prediction, its probability, and the malignant probability."""
    done = results[results["error"] == ""]
    columns = {
        "file": done["file"].map(lambda f: Path(f).name),
        "predicted": done["predicted_class"],
        "p": done[PROBABILITY_COLUMNS].astype(float).max(axis=1).map("{:.3f}".format),
        "benign/malignant": done["predicted_binary"],
        "p(malignant)": done["malignant_probability"].astype(float).map("{:.3f}".format),
    }
    table = pd.DataFrame(columns)
    shown = table.head(SHOWN_ROWS).to_string(index=False)
    return shown + (f"\n… and {len(table) - SHOWN_ROWS} more" if len(table) > SHOWN_ROWS else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="image files, or folders searched recursively")
    parser.add_argument("--model", help="models:/name@alias or another MLflow model URI, a DVC experiment, a folder")
    parser.add_argument("--out", type=Path, default=Path("reports/predictions.csv"), help="CSV to write")
    add_override_argument(parser)
    args = parser.parse_args(argv)
    configure_logging()
    check_out(args.out)
    found = find_images(args.images)
    images = [path for path, why in found if not why]
    predict, shown = load_model(args.model, args.overrides) if images else (None, "no model (no image to classify)")
    results = classify_files(predict, found)
    results[TEXT] = results[TEXT].fillna("").map(printable)
    cells = results.copy()  # a cell a spreadsheet would run as a formula gets a ' first (OWASP: CSV injection)
    cells[TEXT] = cells[TEXT].map(lambda text: f"'{text}" if text.startswith(("=", "+", "-", "@")) else text)
    atomic_write_text(args.out, cells.to_csv(index=False))
    refused = results[results["error"] != ""]
    for file, error, warning in results[TEXT].itertuples(index=False):
        if error or warning:  # a warning: classified all the same
            print(f"refused {file}: {error}" if error else f"warning {file}: {warning}", file=sys.stderr)
    classified = len(results) - len(refused)
    if classified:
        print(summary(results))
    print(f"\n{classified} image(s) classified with {shown}, {len(refused)} refused; every row in", printable(args.out))
    print(CAVEAT)
    if len(refused):
        sys.exit(REFUSED_EXIT_STATUS)


if __name__ == "__main__":
    stage_entry(main)
