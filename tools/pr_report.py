"""The pull-request report: metrics and params against a base revision, and the accuracies with their intervals.

Run: make report BASE=main
     (or: python -m tools.pr_report main [--plots-url URL])

The same markdown is posted on every pull request by .github/workflows/pull-request.yml.
"""

import argparse
import subprocess
from pathlib import Path
from typing import Any

import dvc.api
import pandas as pd
from ruamel.yaml import YAML

from medgemma_breakhis.core.params import dotted_get
from medgemma_breakhis.evaluate.metrics import HEADLINE, Headline


def dvc_markdown(command: str, base: str) -> str:
    """`dvc <command> diff --md <base>`: what reviewers would run themselves."""
    result = subprocess.run(["dvc", command, "diff", "--md", base], capture_output=True, text=True, check=True)
    return result.stdout.strip() or f"No {command} changed."


def evaluation_metrics_at(rev: str | None) -> dict[str, dict[str, Any] | None]:
    """Each metrics file of dvc.yaml's evaluation stages at `rev` (None: the workspace); None where `rev` lacks it."""
    stages = YAML(typ="safe").load(Path("dvc.yaml"))["stages"]
    found: dict[str, dict[str, Any] | None] = {}
    for path in (path for stage in ("baseline", "evaluate") for entry in stages[stage]["metrics"] for path in entry):
        try:
            found[path] = dvc.api.metrics_show(path, rev=rev)  # one target: its metrics, not keyed by path
        except FileNotFoundError:  # e.g. a base branch from before the pipeline produced it
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


def pr_report(base: str, plots_url: str | None = None) -> str:
    plots = (
        f"[Plots: confusion matrices, ROC, training loss, base vs this change]({plots_url}): `index.html` draws "
        "without a network, `png/` holds each plot as an image (`roc_malignant.png`, `training_loss.png`, …)."
        if plots_url
        else f"Plots: run `dvc plots diff {base}` and open `dvc_plots/index.html` (it draws offline); "
        f"`python -m tools.plots_offline png {base}` writes each plot as a PNG."
    )
    intervals = (
        "Intervals resample whole patients, since the images of one patient are correlated. Overlapping intervals "
        "mean the change may be noise; they are not a test."
    )
    sections = [
        f"## Metrics against `{base}`",
        dvc_markdown("metrics", base),
        "### Accuracy with 95% intervals (bootstrap over patients)",
        interval_table(evaluation_metrics_at(base), evaluation_metrics_at(None)),
        intervals,
        f"## Params against `{base}`",
        dvc_markdown("params", base),
        plots,
    ]
    return "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the revision to compare with (a branch, tag or commit)")
    parser.add_argument("--plots-url", help="where the rendered `dvc plots diff` can be seen (set by CI)")
    args = parser.parse_args()
    known = ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{args.base}^{{commit}}"]
    if subprocess.run(known, capture_output=True, check=False).returncode != 0:
        parser.error(f"{args.base!r} is not a branch, tag or commit of this repository (`git fetch` it first?)")
    print(pr_report(args.base, args.plots_url), end="")


if __name__ == "__main__":
    main()
