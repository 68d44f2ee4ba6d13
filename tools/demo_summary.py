"""Baseline, linear probe and fine-tuned metrics of one DVC experiment as a table for the terminal, the paired
difference of fine-tuned against baseline, and a few of its test images to try `make predict` on.

Run: python -m tools.demo_summary <experiment name> [--images reports/demo-images]
"""

import argparse
import json
from pathlib import Path, PurePosixPath
from typing import Any

import dvc.api
import pandas as pd
from dvc.exceptions import PathMissingError
from dvc.scm import RevError

from medgemma_breakhis.core.files import pipeline_paths
from medgemma_breakhis.core.params import dotted_get, load_params
from medgemma_breakhis.evaluate.metrics import HEADLINE
from tools.compare import paired_table

# Every headline figure (`metrics.HEADLINE`) but the count of unparseable answers (`score` never has any), each
# interval under its figure, then the test set's size.
ROWS = [
    row
    for figure in HEADLINE
    if figure.key != "n_unparseable"
    for row in [(figure.label, figure.key)] + ([("  95% interval", f"{figure.key}_ci95")] if figure.interval else [])
] + [("test images", "n_images")]
STAGES = {"baseline": "baseline", "probe": "linear probe", "finetuned": "fine-tuned"}


def experiment_metrics(name: str) -> dict[str, dict[str, Any]]:
    """The baseline's and the fine-tuned model's metrics files at DVC experiment `name`'s commit."""
    try:
        return {stage: json.loads(dvc.api.read(f"metrics/{stage}.json", rev=name)) for stage in STAGES}
    except (PathMissingError, RevError) as err:
        raise SystemExit(f"experiment {name!r}: {err}; `dvc exp show` lists the experiments") from None


def _cell(metrics: dict[str, Any], key: str) -> str:
    if key.endswith("_ci95"):
        return f"{dotted_get(metrics, key + '_low'):.2f}-{dotted_get(metrics, key + '_high'):.2f}"
    value = dotted_get(metrics, key)
    return "n/a" if value is None else f"{value}" if key == "n_images" else f"{value:.3f}"


def stages_table(metrics: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'metric':<28}" + "".join(f"{name:>14}" for name in STAGES.values())]
    for label, key in ROWS:
        lines.append(f"{label:<28}" + "".join(f"{_cell(metrics[stage], key):>14}" for stage in STAGES))
    return "\n".join(lines)


def copy_test_images(experiment: str, out: Path, count: int = 3) -> None:
    """Copy `count` test images of `experiment` (spread over its test split, so benign and malignant) into `out`, read
    from the DVC cache at the experiment's commit: the workspace of a `--temp` experiment has none."""
    paths = pipeline_paths()
    with dvc.api.open(f"{paths['split_dir']}/test.csv", rev=experiment) as stream:
        filenames = pd.read_csv(stream)["filename"]
    out.mkdir(parents=True, exist_ok=True)
    for filename in filenames.iloc[:: max(1, len(filenames) // count)][:count]:
        image = dvc.api.read(f"{paths['raw_dir']}/{filename}", rev=experiment, mode="rb")
        (out / PurePosixPath(filename).name).write_bytes(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("experiment", help="a DVC experiment name, as `dvc exp show` lists it")
    parser.add_argument("--images", type=Path, help="copy three of its test images here, to try make predict on")
    args = parser.parse_args()
    print(f"Experiment {args.experiment}: test-set metrics")
    print(stages_table(experiment_metrics(args.experiment)))
    settings = load_params().eval
    print("\nFine-tuned (B) against baseline (A), paired over the same test patients (docs/metrics.md):")
    side = f"{args.experiment}:"
    print(paired_table(side + "baseline", side + "finetuned", settings.bootstrap_resamples, settings.seed))
    if args.images:
        copy_test_images(args.experiment, args.images)
        print(f"\nIts adapter is a registered model version (make models). Three test images are in {args.images}:")
        print(f"  make predict IMAGES={args.images}")


if __name__ == "__main__":
    main()
