"""Paired comparison of two evaluations of the same test images: for each accuracy, B minus A with a 95% interval
from one bootstrap that draws the same patients for both sides, and a verdict (docs/metrics.md#paired-comparisons).
Run: make compare A=main B=lora-16   (a side: a git revision, DVC experiment or `workspace`, then :baseline, :probe or
     :finetuned, the default), or make compare (each experiment of HEAD against HEAD); or python -m tools.compare --help
"""

import argparse
import io
import sys

import dvc.api
import numpy as np
import pandas as pd
from dvc.exceptions import PathMissingError
from dvc.scm import RevError
from scipy.stats import bootstrap

from medgemma_breakhis.core.params import add_override_argument, load_params

WORKSPACE = "workspace"
# The rates compared: per image (8-class, binary) or per patient (the BreakHis paper's patient-level accuracy).
RATES = (
    ("8-class accuracy", "class", False),
    ("binary accuracy", "binary", False),
    ("patient-level accuracy", "binary", True),
)


class PairingError(ValueError):
    """The two sides cannot be paired; the message says why, in one line."""


def predictions(side: str) -> pd.DataFrame:
    """The per-image predictions of `side` (REV[:STAGE]), read from git at the revision (the workspace's own files)."""
    rev, _, stage = side.partition(":")
    path = f"predictions/{stage or 'finetuned'}.csv"
    try:
        text = dvc.api.read(path, rev=None if rev == WORKSPACE else rev)
    except (PathMissingError, FileNotFoundError):
        raise PairingError(f"{rev} holds no {path}: nothing to compare (`dvc exp show` lists experiments)") from None
    return pd.read_csv(io.StringIO(text), dtype={"patient": str}).sort_values("filename", ignore_index=True)


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """One row per rate: A, B, B - A with its 95% percentile interval over patients drawn alike for both sides, and
    the verdict; PairingError if the two were not scored on the same test images."""
    if not a[["filename", "label"]].equals(b[["filename", "label"]]):
        raise PairingError(
            "the two sides were scored on different test images (another split, fold or magnification): they cannot "
            "be paired; compare their own intervals instead (make report)"
        )
    rows = []
    for label, kind, per_patient in RATES:
        hits = pd.DataFrame({side: p[f"true_{kind}"] == p[f"predicted_{kind}"] for side, p in (("a", a), ("b", b))})
        grouped = hits.groupby(a["patient"])
        tally = grouped.mean() if per_patient else grouped.sum()  # per patient: hits, or a patient's own accuracy
        counts = np.ones(len(tally)) if per_patient else grouped.size().to_numpy()
        sides = (tally["a"].to_numpy(float), tally["b"].to_numpy(float), counts)
        rate = [side.sum() / counts.sum() for side in sides[:2]]
        low, high = bootstrap(
            sides,
            lambda ha, hb, n, axis: (hb.sum(axis=axis) - ha.sum(axis=axis)) / n.sum(axis=axis),
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
        verdict = "better" if low > 0 else "worse" if high < 0 else "no detectable difference at 95%"
        interval = f"{rate[1] - rate[0]:+.3f} [{low:+.3f}, {high:+.3f}]"
        rows.append({"metric": label, "A": rate[0], "B": rate[1], "B - A [95% interval]": interval, "verdict": verdict})
    return pd.DataFrame(rows)


def paired_table(a: str, b: str, resamples: int, seed: int) -> str:
    """The markdown table of `paired_difference` of sides `a` and `b`, or the one line why they cannot be paired."""
    try:
        table = paired_difference(predictions(a), predictions(b), resamples, seed)
        return table.to_markdown(index=False, floatfmt=".3f")
    except PairingError as err:
        return f"{a} against {b}: {err}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sides", nargs="*", metavar="SIDE", help="A and B: REV[:STAGE] (none: each experiment of HEAD)")
    add_override_argument(parser)
    args = parser.parse_args(argv)
    if len(args.sides) not in (0, 2):
        parser.error("give two sides, A and B, or none")
    settings = load_params(overrides=args.overrides).eval
    try:
        experiments = dvc.api.exp_show() if not args.sides else []
        names = [row["Experiment"] for row in experiments if row.get("Experiment") and row["rev"] != WORKSPACE]
        for a, b in [args.sides] if args.sides else [("HEAD", name) for name in names]:
            print(f"\n{b} against {a} (A), {settings.bootstrap_resamples} resamples of patients:")
            print(paired_table(a, b, settings.bootstrap_resamples, settings.seed))
    except RevError as err:
        sys.exit(f"{err}: a side is a branch, tag, commit, DVC experiment name or `workspace`")


if __name__ == "__main__":
    main()
