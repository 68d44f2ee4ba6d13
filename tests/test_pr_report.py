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

# its module-scoped fixture is built once: `make test` hands these tests to one worker
pytestmark = pytest.mark.xdist_group("two_commits")

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
    for name in ("Makefile", "params.yaml", "requirements.txt"):
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
def test_report_leads_with_the_intervals_and_folds_the_diffs(two_commits: tuple[Path, str]) -> None:
    repo, base = two_commits
    result = make_report(repo, f"BASE={base}", "PLOTS_URL=https://ci.example/plots")
    assert result.returncode == 0, result.stderr
    report = re.sub(" +", " ", result.stdout)  # dvc pads its markdown columns
    assert report.startswith(f"## Against `{base}`: accuracy with 95% intervals")
    lead, folded = report.split("<details>", 1)
    assert (
        "| metrics/finetuned.json | 8-class accuracy | 0.500 [0.375, 0.625] | 0.875 [0.750, 1.000] "
        "| no: unlikely to be noise |"
    ) in lead
    assert (
        "| metrics/baseline.json | binary accuracy | 0.250 [0.125, 0.375] | 0.250 [0.125, 0.375] | unchanged |"
    ) in lead
    assert "[Plots: confusion matrices, ROC, training loss, base vs this change](https://ci.example/plots)" in lead
    assert "| metrics/finetuned.json | eight_class.accuracy | 0.5 | 0.875 | 0.375 |" in folded
    assert "| metrics/finetuned.json | binary.accuracy_ci95_low | 0.375 | 0.75 | 0.375 |" in folded
    assert "metrics/baseline.json" not in folded.split("Params")[0]  # unchanged: not in the diff
    assert "| params.yaml | lora.r | 8 | 16 |" in folded


@pytest.mark.slow  # make, git and the dvc CLI in subprocesses
def test_report_takes_an_experiment_name_and_says_when_there_is_nothing_to_compare(
    two_commits: tuple[Path, str], tmp_path: Path
) -> None:
    repo = shutil.copytree(two_commits[0], tmp_path / "repo")
    (repo / "metrics" / "finetuned.json").write_text(json.dumps(metrics(0.625, 0.5, 0.75)))
    subprocess.run([VENV / "bin" / "dvc", "exp", "save", "-q", "-n", "another-try"], cwd=repo, check=True)
    git(repo, "checkout", "-q", "--", "metrics")
    result = make_report(repo, "BASE=another-try")
    assert result.returncode == 0, result.stderr
    assert "| metrics/finetuned.json | 8-class accuracy | 0.625 [0.500, 0.750] | 0.875 [0.750, 1.000] |" in (
        re.sub(" +", " ", result.stdout)
    )
    git(repo, "checkout", "-q", "-b", "empty", git(repo, "rev-list", "--max-parents=0", "HEAD"))
    git(repo, "rm", "-q", "-r", "metrics")
    git(repo, "commit", "-qm", "nothing measured yet")
    result = make_report(repo, "BASE=empty")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "`empty` holds none of metrics/baseline.json, metrics/probe.json, metrics/finetuned.json, so there is nothing "
        "to compare with: compare with a revision whose reproduced outputs were committed, or with an experiment "
        "(`make report BASE=<name>`, names from `dvc exp show`).\n"
    )
    result = make_report(repo, "BASE=no-such-thing")
    assert result.returncode != 0
    assert "'no-such-thing' is no branch, tag, commit or DVC experiment of this repository" in result.stderr


@pytest.mark.slow  # make in a subprocess, on the repository the fixture builds with git and dvc
def test_report_without_base_says_how_to_call_it(two_commits: tuple[Path, str]) -> None:
    result = make_report(two_commits[0])
    assert result.returncode != 0
    assert "usage: make report BASE=<branch, tag, commit or experiment>" in result.stderr


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
