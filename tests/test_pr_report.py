"""`make report` on a temporary repository with two commits of different metrics and params."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tools.pr_report import interval_table

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent


def metrics(accuracy: float, low: float, high: float) -> dict:
    section = {"accuracy": accuracy, "accuracy_ci95_low": low, "accuracy_ci95_high": high}
    return {
        "eight_class": {**section, "f1_weighted": accuracy},
        "binary": {**section, "f1_malignant": accuracy},
        "n_images": 40,
    }


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def make_report(repo: Path, *arguments: str) -> subprocess.CompletedProcess:
    # The test's own environment stands in for `make setup`: `-o` keeps make from reinstalling it.
    return subprocess.run(
        ["make", "-s", "report", f"VENV={VENV}", "-o", f"{VENV}/.installed", *arguments],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    repo = tmp_path_factory.mktemp("report-repo")
    for name in ("Makefile", "dvc.yaml", "paths.yaml", "params.yaml", "requirements.txt"):
        shutil.copy2(REPO / name, repo / name)
    for package in ("medgemma_breakhis", "tools"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "metrics").mkdir()
    git(repo, "init", "-q", "-b", "main")
    subprocess.run([VENV / "bin" / "dvc", "init", "-q"], cwd=repo, check=True)
    for name, values in (("baseline", metrics(0.25, 0.125, 0.375)), ("finetuned", metrics(0.5, 0.375, 0.625))):
        (repo / "metrics" / f"{name}.json").write_text(json.dumps(values))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD")
    (repo / "metrics" / "finetuned.json").write_text(json.dumps(metrics(0.875, 0.75, 1.0)))
    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    params["lora"]["r"] = 16
    yaml.dump(params, repo / "params.yaml")
    git(repo, "commit", "-qam", "a better adapter")
    return repo, base


@pytest.mark.slow  # make, git and the dvc CLI in subprocesses
def test_report_shows_diffs_and_intervals_side_by_side(two_commits: tuple[Path, str]) -> None:
    repo, base = two_commits
    result = make_report(repo, f"BASE={base}", "PLOTS_URL=https://ci.example/plots")
    assert result.returncode == 0, result.stderr
    report = re.sub(" +", " ", result.stdout)  # dvc pads its markdown columns
    assert report.startswith(f"## Metrics against `{base}`")
    assert "| metrics/finetuned.json | eight_class.accuracy | 0.5 | 0.875 | 0.375 |" in report
    assert "| metrics/finetuned.json | binary.accuracy_ci95_low | 0.375 | 0.75 | 0.375 |" in report
    assert "metrics/baseline.json" not in report.split("### Accuracy")[0]  # unchanged: not in the diff
    assert (
        "| metrics/finetuned.json | 8-class accuracy | 0.500 [0.375, 0.625] | 0.875 [0.750, 1.000] "
        "| no: unlikely to be noise |"
    ) in report
    assert (
        "| metrics/baseline.json | binary accuracy | 0.250 [0.125, 0.375] | 0.250 [0.125, 0.375] | unchanged |"
    ) in report
    assert "| params.yaml | lora.r | 8 | 16 |" in report
    assert "[Plots: confusion matrices, ROC, training loss, base vs this change](https://ci.example/plots)" in report


@pytest.mark.slow  # make in a subprocess, on the repository the fixture builds with git and dvc
def test_report_without_base_says_how_to_call_it(two_commits: tuple[Path, str]) -> None:
    result = make_report(two_commits[0])
    assert result.returncode != 0
    assert "usage: make report BASE=<branch, tag or commit>" in result.stderr


def test_interval_table_marks_overlap_and_missing_files() -> None:
    base = {"metrics/finetuned.json": metrics(0.5, 0.3, 0.7), "metrics/baseline.json": None}
    head = {"metrics/finetuned.json": metrics(0.6, 0.4, 0.8), "metrics/baseline.json": metrics(0.2, 0.1, 0.3)}
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in interval_table(base, head).splitlines()]
    assert rows[0] == ["metrics file", "metric", "base", "this change", "95% intervals overlap"]
    assert rows[2] == ["metrics/baseline.json", "8-class accuracy", "no such file", "0.200 [0.100, 0.300]", "n/a"]
    assert rows[4] == [
        "metrics/finetuned.json",
        "8-class accuracy",
        "0.500 [0.300, 0.700]",
        "0.600 [0.400, 0.800]",
        "yes: could be noise",
    ]
