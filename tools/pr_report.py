"""The pull-request report against a base revision: the headline figures with their intervals first, then every
metric's and param's diff, folded.

Run: make report BASE=main   (a branch, tag, commit or DVC experiment name: what `dvc metrics diff` takes)
     (or: python -m tools.pr_report main [--plots-url URL])

The same markdown is posted on every pull request by .github/workflows/pull-request.yml.
"""

import argparse
import json
import subprocess
from typing import Any

import dvc.api
import pandas as pd
from dvc.exceptions import PathMissingError
from dvc.scm import RevError

from medgemma_breakhis.core.params import dotted_get, load_params
from medgemma_breakhis.evaluate.metrics import HEADLINE, Headline
from tools.compare import WORKSPACE, paired_table

EVALUATIONS = ("metrics/baseline.json", "metrics/probe.json", "metrics/finetuned.json")
# Every figure the stages write, where the headline metrics DVC shows (metrics/headline/) leave them out.
DETAILS = (*EVALUATIONS, "metrics/train.json", "metrics/data.json")
PAIRED = (
    "A paired interval resamples the same patients for both sides, so it is far narrower than two intervals compared "
    "side by side (docs/metrics.md#paired-comparisons)."
)
INTERVALS = (
    "Intervals resample whole patients, since the images of one patient are correlated. Overlapping intervals mean the "
    "change may be noise; they are not a test."
)


def dvc_markdown(command: str, base: str, *targets: str) -> str:
    """`dvc <command> diff --md <base> [--targets …]`: what reviewers would run themselves."""
    command_line = ["dvc", command, "diff", "--md", base, *(["--targets", *targets] if targets else [])]
    result = subprocess.run(command_line, capture_output=True, text=True, check=True)
    return result.stdout.strip() or f"No {command} changed."


def evaluation_metrics_at(rev: str | None) -> dict[str, dict[str, Any] | None]:
    """Each evaluation's metrics file at `rev` (None: the workspace); None where `rev` lacks it."""
    found: dict[str, dict[str, Any] | None] = {}
    for path in EVALUATIONS:
        try:
            found[path] = json.loads(dvc.api.read(path, rev=rev))
        except (FileNotFoundError, PathMissingError):  # e.g. a base branch from before the pipeline produced it
            found[path] = None
    return found


def _figures(values: dict[str, Any] | None, figure: Headline) -> list[float] | None:
    """The figure and its interval's bounds, if `values` has them."""
    found = [dotted_get(values or {}, f"{figure.key}{suffix}") for suffix in ("", "_ci95_low", "_ci95_high")]
    return None if None in found else found


def _interval(values: dict[str, Any] | None, figure: Headline) -> str:
    if values is None:
        return "no such file"
    if (found := _figures(values, figure)) is None:
        value = dotted_get(values, figure.key)
        return "n/a" if value is None else f"{value:.3f} (no interval)"
    return f"{found[0]:.3f} [{found[1]:.3f}, {found[2]:.3f}]"


def _overlap(base: dict[str, Any] | None, head: dict[str, Any] | None, figure: Headline) -> str:
    b, h = _figures(base, figure), _figures(head, figure)
    if b is None or h is None:
        return "n/a"
    if b == h:
        return "unchanged"
    apart = b[2] < h[1] or h[2] < b[1]
    return "no: unlikely to be noise" if apart else "yes: could be noise"


def interval_table(base: dict[str, dict[str, Any]], head: dict[str, dict[str, Any]]) -> str:
    rows = [
        {
            "metrics file": path,
            "metric": figure.label,
            "base": _interval(base.get(path), figure),
            "this change": _interval(head.get(path), figure),
            "95% intervals overlap": _overlap(base.get(path), head.get(path), figure),
        }
        for path in sorted(set(base) | set(head))
        for figure in HEADLINE
        if figure.interval
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def folded(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def pr_report(base: str, plots_url: str | None = None) -> str:
    """The report's markdown; one line saying what to do when `base` holds no evaluation to compare with."""
    base_metrics = evaluation_metrics_at(base)
    if not any(base_metrics.values()):
        return (
            f"`{base}` holds none of {', '.join(EVALUATIONS)}, so there is nothing to compare with: compare with a "
            "revision whose reproduced outputs were committed, or with an experiment (`make report BASE=<name>`, "
            "names from `dvc exp show`).\n"
        )
    plots = (
        f"[Plots: confusion matrices, ROC, training loss, base vs this change]({plots_url}): `index.html` draws "
        "without a network, `png/` holds each plot as an image (`roc_malignant.png`, `training_loss.png`, …)."
        if plots_url
        else f"Plots: run `dvc plots diff {base}` and open `dvc_plots/index.html` (it draws offline); "
        f"`python -m tools.plots_offline png {base}` writes each plot as a PNG."
    )
    settings = load_params().eval
    sides = {f"`{base}` (A)": f"{base}:finetuned", "the linear probe (A), this change": f"{WORKSPACE}:probe"}
    sections = [
        f"## Against `{base}`: accuracy with 95% intervals (bootstrap over patients)",
        interval_table(base_metrics, evaluation_metrics_at(None)),
        INTERVALS,
        *(
            f"## Fine-tuned, this change (B), against {against}: paired over the same test patients\n\n"
            + paired_table(side, f"{WORKSPACE}:finetuned", settings.bootstrap_resamples, settings.seed)
            for against, side in sides.items()
        ),
        PAIRED,
        plots,
        folded(
            "Every metric: per class, calibration, patients, training, the split",
            dvc_markdown("metrics", base, *DETAILS),
        ),
        folded("Params", dvc_markdown("params", base)),
    ]
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the revision to compare with: a branch, tag, commit or DVC experiment name")
    parser.add_argument("--plots-url", help="where the rendered `dvc plots diff` can be seen (set by CI)")
    args = parser.parse_args()
    try:
        print(pr_report(args.base, args.plots_url), end="")
    except RevError:
        parser.error(f"{args.base!r} is no branch, tag, commit or DVC experiment of this repository (`git fetch` it?)")


if __name__ == "__main__":
    main()
