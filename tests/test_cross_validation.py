"""The cross-validation summary on hand-made per-fold metrics files, and `make cv` end to end: cv/dvc.yaml run by
`dvc repro` over two folds, its summary, its MLflow runs, and a fresh clone that pulls its outputs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
from dvc_cli import clean_in_a_fresh_clone, read_json, run, run_json, search
from repo_params import params
from ruamel.yaml import YAML

from medgemma_breakhis.report.cross_validation import (
    CrossValidationError,
    fold_name,
    read_fold_metrics,
    summarise_magnifications,
    write_summary,
)

ACCURACIES = {1: 0.5, 2: 0.75, 3: 0.625}


def write_fold(metrics_dir: Path, fold: int, magnification: int, accuracy: float, roc_auc: bool = True) -> None:
    folder = metrics_dir / fold_name(fold, magnification)
    folder.mkdir(parents=True)
    binary = {"accuracy": accuracy + 0.25, **({"roc_auc": accuracy} if roc_auc else {})}
    files = {
        "data": {"test": {"images": 30 + fold, "patients": 8}},
        "baseline": {
            "eight_class": {"accuracy": 0.125, "f1_weighted": 0.1, "per_class": {"a": {"f1": 0.3}}},
            "binary": {"accuracy": 0.5},
            "patient_level": {"accuracy": 0.5},
        },
        "finetuned": {
            "eight_class": {"accuracy": accuracy, "f1_weighted": accuracy - 0.1, "per_class": {"a": {"f1": 0.9}}},
            "binary": binary,
            "patient_level": {"accuracy": accuracy},
            "n_images": 30 + fold,
        },
        "train": {"train_loss_last": 1.0 / fold, "global_steps": 80},
    }
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))


def test_mean_and_spread_of_every_metric_over_the_folds(tmp_path: Path) -> None:
    for fold, accuracy in ACCURACIES.items():
        write_fold(tmp_path, fold, 100, accuracy)
    write_fold(tmp_path, 4, 100, 0.0)  # a fold no longer in cv.folds: stale, never averaged in
    summary = summarise_magnifications(read_fold_metrics(tmp_path, params({"cv": {"folds": [1, 2, 3]}}).cv))["100x"]
    assert summary["n_folds"] == 3 and summary["folds"] == ["fold1-100x", "fold2-100x", "fold3-100x"]
    values = list(ACCURACIES.values())
    assert summary["finetuned"]["eight_class"]["accuracy"] == pytest.approx(
        {"mean": statistics.mean(values), "std": statistics.stdev(values), "min": 0.5, "max": 0.75}
    )
    assert summary["finetuned"]["binary"]["roc_auc"]["mean"] == pytest.approx(statistics.mean(values))
    assert summary["train"]["train_loss_last"]["max"] == 1.0
    assert summary["data"]["test"]["images"] == pytest.approx({"mean": 32.0, "std": 1.0, "min": 31.0, "max": 33.0})
    assert summary["baseline"]["eight_class"]["accuracy"]["std"] == 0.0
    assert "per_class" not in summary["finetuned"]["eight_class"]


def test_summary_and_table_are_written_per_magnification(tmp_path: Path) -> None:
    for magnification in (40, 100):
        for fold, accuracy in ACCURACIES.items():
            write_fold(tmp_path / "metrics", fold, magnification, accuracy)
    cv = params({"cv": {"folds": [1, 2, 3], "magnifications": [40, 100]}}).cv
    table = write_summary(tmp_path / "metrics", cv, tmp_path / "summary.json", tmp_path / "summary.md")
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"40x", "100x"}
    assert (tmp_path / "summary.md").read_text() == table
    lines = table.splitlines()
    assert lines[0] == "### 40X, 3 folds"
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[1:8]]
    assert cells[0][0] == "fold"
    assert cells[2][:9] == ["1", "31", "8", "0.125", "0.500", "0.400", "0.750", "0.500", "0.500"]
    assert cells[5][:5] == ["mean ± std", "32.000 ± 1.000", "8.000 ± 0.000", "0.125 ± 0.000", "0.625 ± 0.125"]
    assert cells[6][:5] == ["[min, max]", "[31, 33]", "[8, 8]", "[0.125, 0.125]", "[0.500, 0.750]"]
    assert "### 100X, 3 folds" in lines


def test_a_missing_fold_says_how_to_make_it(tmp_path: Path) -> None:
    write_fold(tmp_path, 1, 100, 0.5)
    with pytest.raises(CrossValidationError, match=r"missing .*fold2-100x/data.json.*run `dvc repro cv/dvc.yaml`"):
        summarise_magnifications(read_fold_metrics(tmp_path, params({"cv": {"folds": [1, 2]}}).cv))


def test_a_metric_one_fold_lacks_is_an_error_not_a_smaller_average(tmp_path: Path) -> None:
    write_fold(tmp_path, 1, 100, 0.5)
    write_fold(tmp_path, 2, 100, 0.75, roc_auc=False)
    with pytest.raises(CrossValidationError, match="fold1-100x has metrics other folds lack: finetuned.binary.roc_auc"):
        summarise_magnifications(read_fold_metrics(tmp_path, params({"cv": {"folds": [1, 2]}}).cv))


def test_a_metric_no_fold_has_is_shown_as_not_available(tmp_path: Path) -> None:
    """eval.method=generate has no probabilities, so no ROC-AUC in any fold: the table says so instead of failing."""
    for fold, accuracy in ACCURACIES.items():
        write_fold(tmp_path / "metrics", fold, 100, accuracy, roc_auc=False)
    table = write_summary(
        tmp_path / "metrics",
        params({"cv": {"folds": [1, 2, 3]}}).cv,
        tmp_path / "summary.json",
        tmp_path / "summary.md",
    )
    rows = [[cell.strip() for cell in row.split("|")[1:-1]] for row in table.splitlines()[3:]]
    assert [row[7] for row in rows] == ["n/a"] * 5  # the binary ROC-AUC column, folds and aggregates
    assert "roc_auc" not in json.loads((tmp_path / "summary.json").read_text())["100x"]["finetuned"]["binary"]


def set_params(repo: Path, **values: object) -> None:
    """Edit params.yaml in place, e.g. set_params(repo, train__epochs=1)."""
    yaml = YAML()
    params = yaml.load(repo / "params.yaml")
    for key, value in values.items():
        section, name = key.split("__")
        params[section][name] = value
    yaml.dump(params, repo / "params.yaml")


def open_cross_validation(repo: Path) -> None:
    """What `make cv` does before running it: take cv/dvc.yaml into the DVC project (.dvcignore keeps it out)."""
    ignore = repo / ".dvcignore"
    ignore.write_text(
        "".join(line for line in ignore.read_text().splitlines(keepends=True) if line.strip() != "/cv/dvc.yaml")
    )


@pytest.mark.e2e  # the real dvc CLI over cv/dvc.yaml, in a copy of the reproduced repository
def test_cross_validation_runs_every_fold_and_writes_mean_and_spread(workspace: Path, tmp_path: Path) -> None:
    repo = workspace
    folds = [1, 2]  # a matrix of two folds runs the same machinery as one of five
    set_params(repo, train__epochs=1, cv__folds=folds)
    open_cross_validation(repo)
    output = run(repo, "dvc", "repro", "cv/dvc.yaml")
    for stage in ("split", "baseline", "train", "evaluate"):
        assert all(f"Running stage 'cv/dvc.yaml:{stage}@{fold}-100'" in output for fold in folds), stage
    assert "Running stage 'cv/dvc.yaml:summary'" in output
    assert "Running stage 'train'" not in output and "Running stage 'download'" not in output

    per_fold = [read_json(repo / "cv" / "metrics" / f"fold{fold}-100x" / "finetuned.json") for fold in folds]
    accuracies = [metrics["eight_class"]["accuracy"] for metrics in per_fold]
    summary = read_json(repo / "cv" / "summary.json")["100x"]
    assert summary["n_folds"] == len(folds)
    assert summary["finetuned"]["eight_class"]["accuracy"] == pytest.approx(
        {
            "mean": statistics.mean(accuracies),
            "std": statistics.stdev(accuracies),
            "min": min(accuracies),
            "max": max(accuracies),
        }
    )
    test_sets = [
        set(pd.read_csv(repo / "cv" / "folds" / f"fold{fold}-100x" / "split" / "test.csv")["patient"]) for fold in folds
    ]
    assert all(not a & b for i, a in enumerate(test_sets) for b in test_sets[i + 1 :])  # each patient tested once
    table = (repo / "cv" / "summary.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[3:]] == ["1", "2", "mean ± std", "[min, max]"]
    (workspace,) = run_json(repo, "dvc", "metrics", "show", "--json").values()
    assert "cv/summary.json" in workspace["data"]

    *_, parent = search(repo, "tags.run_kind = 'pipeline' and tags.dvc_exp_name = 'workspace'")
    trains = search(repo, f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'train'")
    assert sorted(int(train.data.params["split.fold"]) for train in trains) == folds
    lock = YAML(typ="safe").load(repo / "cv" / "dvc.lock")["stages"]
    for train in trains:
        fold = train.data.params["split.fold"]
        assert train.info.run_name == f"train fold{fold} 100x"
        (adapter,) = [o for o in lock[f"train@{fold}-100"]["outs"] if o["path"].endswith("adapter")]
        assert train.data.tags["adapter_dvc_md5"] == adapter["md5"]
    assert "Running stage" not in run(repo, "dvc", "repro", "cv/dvc.yaml")

    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "cross-validation")
    # once it has run, cv/dvc.yaml's outputs are pulled like the rest
    clone = clean_in_a_fresh_clone(repo, tmp_path, base="HEAD~1")
    assert (clone / "cv" / "folds" / "fold2-100x" / "adapter" / "adapter_config.json").is_file()
