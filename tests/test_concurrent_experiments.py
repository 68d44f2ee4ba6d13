"""Two experiments in one workspace: a second `dvc exp run` writes its -S values into params.yaml before it fails on
DVC's lock, under the first one's running stages. A stage that notices refuses to record anything."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from medgemma_breakhis.params import (
    ParamsChangedError,
    changed_since,
    dvc_set_params,
    file_digest,
    load_params,
)
from medgemma_breakhis.tracking import experiment_id, stage_run
from stages import baseline

PARAMS = "model:\n  id: tiny-gemma3\neval:\n  bootstrap_resamples: {resamples}\n"


def baseline_argv(synthetic_root: Path, split: Path, metrics: str) -> list[str]:
    return [
        *("--images", str(synthetic_root), "--test", str(split / "test.csv")),
        *("--metrics", metrics, "--predictions", "predictions.csv", "--roc", "roc.csv"),
    ]


@pytest.mark.slow  # the baseline stage, twice
def test_a_stage_refuses_to_record_after_params_yaml_changed_under_its_pipeline_execution(
    stage_folder: Path, synthetic_root: Path, split_dir: Path
) -> None:
    (stage_folder / "params.yaml").write_text(PARAMS.format(resamples=100))
    baseline.main(baseline_argv(synthetic_root, split_dir, "first.json"))  # the execution's first stage
    # what a second `dvc exp run -S eval.bootstrap_resamples=200` in the same workspace writes, then fails on the lock
    (stage_folder / "params.yaml").write_text(PARAMS.format(resamples=200))
    with pytest.raises(
        ParamsChangedError,
        match=r"^params.yaml changed while this stage ran \(since this pipeline execution's first stage began\): "
        r"another `dvc exp run` in this workspace",
    ):
        baseline.main(baseline_argv(synthetic_root, split_dir, "second.json"))  # a later stage of the same execution
    assert (stage_folder / "first.json").is_file() and not (stage_folder / "second.json").exists()
    runs = mlflow.MlflowClient().search_runs([experiment_id()], "tags.stage = 'baseline'")
    assert [run.data.params["eval.bootstrap_resamples"] for run in runs] == ["100"]  # nothing recorded under 200


def test_params_yaml_changed_while_a_stage_ran_is_refused_before_its_results_are_written(
    stage_folder: Path, split_dir: Path
) -> None:
    (stage_folder / "params.yaml").write_text(PARAMS.format(resamples=100))
    with (
        pytest.raises(ParamsChangedError, match=r"^params.yaml changed while this stage ran \(since this stage began"),
        stage_run("baseline", load_params(), split_dir / "test.csv", stage_folder / "untracked.json") as tracked,
    ):
        (stage_folder / "params.yaml").write_text(PARAMS.format(resamples=200))
        tracked.refuse_if_params_changed()
    (run,) = mlflow.MlflowClient().search_runs([experiment_id()], "tags.stage = 'baseline'")
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("ParamsChangedError: ")


def test_the_values_dvc_exp_run_was_asked_for_are_checked_against_params_yaml(tmp_path: Path) -> None:
    command = [
        *("/venv/bin/python", "/venv/bin/dvc", "exp", "run", "-S", "eval.bootstrap_resamples=100"),
        *("--set-param=params.yaml:lora.r=16", "-S", "other.yaml:x=1", "-S", "lora.alpha=8,16", "-S", "cv.folds=[1,2]"),
    ]
    asked = dvc_set_params(command)
    assert asked == {"eval.bootstrap_resamples": 100, "lora.r": 16, "cv.folds": [1, 2]}  # not a sweep, nor another file
    assert dvc_set_params(["dvc", "repro", "-S", "lora.r=1"]) == {}
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  bootstrap_resamples: 200\nlora:\n  r: 16\ncv:\n  folds: [1, 2]\n")
    assert changed_since(file_digest(params), asked, params) == (
        f"{params} has eval.bootstrap_resamples=200, but dvc exp run was asked for eval.bootstrap_resamples=100"
    )
    params.write_text(json.dumps({"eval": {"bootstrap_resamples": 100}, "lora": {"r": 16}, "cv": {"folds": [1, 2]}}))
    assert changed_since(file_digest(params), asked, params) is None
