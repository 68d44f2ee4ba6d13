"""Classify new images with a fine-tuned adapter: write the eight class probabilities, the predicted type and
benign/malignant of each to a CSV, and print a short table.

Run: make predict IMAGES='new/slide-1.png new/batch/' [MODEL=...] [OUT=reports/predictions.csv]
     (or: python -m tools.predict IMAGE_OR_FOLDER... [--model MODEL] [--out CSV] [-S key=value])

MODEL: a registered version (`models:/medgemma-breakhis@champion`, `models:/medgemma-breakhis/3`, any MLflow model
URI), a DVC experiment's name (the version its `evaluate` registered), or an adapter folder such as `models/adapter`
(the base model then comes from params.yaml and -S). Without it: the version with the alias `champion`, else the
newest version. A folder is searched recursively for image files. A refused image gets a line on stderr and its
`error` in the CSV, one unlike BreakHis's a line and its `warning` (classified all the same); exit status 3 when any
was refused (`make predict` takes that as done: the refusals are listed), 1 when nothing could run, else 0."""

import argparse
import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlflow
import pandas as pd

from medgemma_breakhis.core.files import atomic_write_text
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import add_override_argument, load_params
from medgemma_breakhis.core.stage import stage_entry
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS
from medgemma_breakhis.registry.model import IMAGE_COLUMN, OUTPUT_COLUMNS, classify, load_adapter_model
from medgemma_breakhis.track.store import open_store
from tools.models import ModelNotFound, default_model_uri, experiment_model_uri

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# Larger than any image the classifier accepts (40 megapixels uncompressed, in 16-bit RGBA): never read into memory.
MAX_FILE_BYTES = 400 * 2**20
# Images read and scored per call of the model, so a folder of thousands never sits in memory at once.
CHUNK = 64
REFUSED_EXIT_STATUS = 3
SHOWN_ROWS = 20
Predict = Callable[[pd.DataFrame], pd.DataFrame]
# MedGemma's intended use (its model card), in our words; printed once per run.
CAVEAT = (
    "Research use only. MedGemma, and any adapter trained from it here, is a starting point for developers: its "
    "outputs are not validated for clinical use and must not inform a diagnosis or a patient's care without "
    "validation on your own data and use case."
)


def find_images(arguments: list[Path]) -> tuple[list[Path], dict[str, str]]:
    """The image files named, or found in the folders named; and why each argument that yields none does not."""
    files, failures = [], {}
    for argument in arguments:
        if argument.is_dir():
            inside = sorted(path for path in argument.rglob("*") if path.is_file())
            found = [path for path in inside if path.suffix.lower() in IMAGE_SUFFIXES]
            if len(inside) > len(found):
                logger.info("%s: %d file(s) without an image suffix left out", argument, len(inside) - len(found))
            if not found:
                failures[str(argument)] = f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})"
            files += found
        elif argument.is_file():
            files.append(argument)  # named by the user: tried whatever its suffix
        else:
            failures[str(argument)] = "no such file or folder"
    return files, failures


def read_bytes(path: Path) -> bytes | str:
    """The file's bytes, or why it cannot be read (refused by size before reading)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return f"{size / 2**20:.0f} MiB is larger than any image read here (at most {MAX_FILE_BYTES // 2**20} MiB)"
        return path.read_bytes()
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"


def load_model(choice: str | None, params_overrides: list[str]) -> tuple[Predict, str]:
    """(the model's `predict(DataFrame)`, what it is) for `--model` (see the module doc)."""
    params = load_params(overrides=params_overrides)
    if choice is not None and Path(choice).is_dir():
        model, processor = load_adapter_model(Path(choice), params.model, params.eval.precision)
        predict = partial(classify, model, processor, batch_size=params.eval.batch_size)
        return predict, f"the adapter in {choice} on {params.model.id}"
    open_store()
    name = params.registry.model_name
    if choice is None:
        uri = default_model_uri(name)
    elif ":/" in choice:
        uri = choice
    else:
        uri = experiment_model_uri(name, choice)
    try:
        return mlflow.pyfunc.load_model(uri).predict, uri
    except mlflow.exceptions.MlflowException as err:
        raise ModelNotFound(f"cannot load model {uri}: {err.message}") from None


def classify_files(predict: Predict | None, files: list[Path]) -> pd.DataFrame:
    """One row per file (`file` and the model's output columns), in order."""
    columns = ["file", *OUTPUT_COLUMNS]
    tables = []
    for start in range(0, len(files), CHUNK):
        chunk = files[start : start + CHUNK]
        contents = [read_bytes(path) for path in chunk]
        readable = [i for i, content in enumerate(contents) if isinstance(content, bytes)]
        # an unreadable file's error is why; a readable one's is the model's
        table = pd.DataFrame({"file": [str(path) for path in chunk], "error": contents}, columns=columns, dtype=object)
        if readable:
            predicted = predict(pd.DataFrame({IMAGE_COLUMN: [contents[i] for i in readable]}))
            table.loc[readable, OUTPUT_COLUMNS] = predicted[OUTPUT_COLUMNS].to_numpy()
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)


def summary(results: pd.DataFrame) -> str:
    """The classified images as a short table: file, prediction, its probability, and the malignant probability."""
    done = results[results["error"] == ""]
    table = pd.DataFrame(
        {
            "file": done["file"].map(lambda f: Path(f).name),
            "predicted": done["predicted_class"],
            "p": done[PROBABILITY_COLUMNS].astype(float).max(axis=1).map("{:.3f}".format),
            "benign/malignant": done["predicted_binary"],
            "p(malignant)": done["malignant_probability"].astype(float).map("{:.3f}".format),
        }
    )
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
    files, failures = find_images(args.images)
    predict, shown = load_model(args.model, args.overrides) if files else (None, "no model (no image to classify)")
    results = classify_files(predict, files)
    failed = pd.DataFrame({"file": list(failures), "error": list(failures.values())})
    results = pd.concat([results, failed.reindex(columns=results.columns)], ignore_index=True)
    results[["error", "warning"]] = results[["error", "warning"]].fillna("")
    atomic_write_text(args.out, results.to_csv(index=False))
    refused = results[results["error"] != ""]
    for file, error, warning in results[["file", "error", "warning"]].itertuples(index=False):
        if error or warning:  # a warning: classified all the same
            print(f"refused {file}: {error}" if error else f"warning {file}: {warning}", file=sys.stderr)
    classified = len(results) - len(refused)
    if classified:
        print(summary(results))
    print(f"\n{classified} image(s) classified with {shown}, {len(refused)} refused; every row in {args.out}")
    print(CAVEAT)
    if len(refused):
        sys.exit(REFUSED_EXIT_STATUS)


if __name__ == "__main__":
    stage_entry(main)
