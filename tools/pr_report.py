"""The pull-request report: metrics and params against a base revision, and the accuracies with their intervals.

Run: make report BASE=main
     (or: python -m tools.pr_report main [--plots-url URL])

The same markdown is posted on every pull request by .github/workflows/pull-request.yml.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

import dvc.api
import pandas as pd
from ruamel.yaml import YAML

INTERVAL_METRICS = (("8-class accuracy", "eight_class"), ("binary accuracy", "binary"))
EVALUATION_STAGES = ("baseline", "evaluate")


def dvc_markdown(command: str, base: str) -> str:
    """`dvc <command> diff --md <base>`: what reviewers would run themselves."""
    result = subprocess.run(["dvc", command, "diff", "--md", base], capture_output=True, text=True, check=True)
    return result.stdout.strip() or f"No {command} changed."


def evaluation_metrics_files(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The metrics files of the evaluation stages, as dvc.yaml declares them."""
    stages = YAML(typ="safe").load(dvc_yaml)["stages"]
    return [path for stage in EVALUATION_STAGES for entry in stages[stage]["metrics"] for path in entry]


def evaluation_metrics_at(rev: str | None) -> dict[str, dict[str, Any] | None]:
    """Each evaluation metrics file at `rev` (None: the workspace); None where the revision does not have it."""
    found: dict[str, dict[str, Any] | None] = {}
    for path in evaluation_metrics_files():
        try:
            found[path] = dvc.api.metrics_show(path, rev=rev)  # one target: its metrics, not keyed by path
        except FileNotFoundError:  # e.g. a base branch from before the pipeline produced it
            found[path] = None
    return found


def _interval(values: dict[str, Any] | None, section: str) -> str:
    if values is None:
        return "no such file"
    figures = values.get(section, {})
    if "accuracy_ci95_low" not in figures:
        return "n/a" if "accuracy" not in figures else f"{figures['accuracy']:.3f} (no interval)"
    return f"{figures['accuracy']:.3f} [{figures['accuracy_ci95_low']:.3f}, {figures['accuracy_ci95_high']:.3f}]"


def _overlap(base: dict[str, Any] | None, head: dict[str, Any] | None, section: str) -> str:
    b, h = (base or {}).get(section, {}), (head or {}).get(section, {})
    if "accuracy_ci95_low" not in b or "accuracy_ci95_low" not in h:
        return "n/a"
    keys = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high")
    if [b[k] for k in keys] == [h[k] for k in keys]:
        return "unchanged"
    apart = b["accuracy_ci95_high"] < h["accuracy_ci95_low"] or h["accuracy_ci95_high"] < b["accuracy_ci95_low"]
    return "no: unlikely to be noise" if apart else "yes: could be noise"


def interval_table(base: dict[str, dict[str, Any]], head: dict[str, dict[str, Any]]) -> str:
    rows = [
        {
            "metrics file": path,
            "metric": label,
            "base": _interval(base.get(path), section),
            "this change": _interval(head.get(path), section),
            "95% intervals overlap": _overlap(base.get(path), head.get(path), section),
        }
        for path in sorted(set(base) | set(head))
        for label, section in INTERVAL_METRICS
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def pr_report(base: str, plots_url: str | None = None) -> str:
    plots = (
        f"[Plots: confusion matrices, ROC, training loss, base vs this change]({plots_url})"
        if plots_url
        else f"Plots: run `dvc plots diff {base}` and open `dvc_plots/index.html`."
    )
    return (
        "\n\n".join(
            [
                f"## Metrics against `{base}`",
                dvc_markdown("metrics", base),
                "### Accuracy with 95% intervals (bootstrap over patients)",
                interval_table(evaluation_metrics_at(base), evaluation_metrics_at(None)),
                (
                    "Intervals resample whole patients, since the images of one patient are correlated. Overlapping intervals "
                    "mean the change may be noise; they are not a test."
                ),
                f"## Params against `{base}`",
                dvc_markdown("params", base),
                plots,
            ]
        )
        + "\n"
    )


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
