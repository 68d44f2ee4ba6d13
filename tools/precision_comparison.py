"""Fine-tune in bf16 and in fp16 with otherwise identical params (each a temporary DVC experiment), then compare the
two runs as MLflow recorded them; a diverged run is a row, not a crash (docs/tracking.md).
Run: make compare-precision [OFFLINE=1]   (or: python -m tools.precision_comparison [-S key=value ...] [--out PATH])"""

import argparse
import datetime
import logging
import math
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.entities import Run

from medgemma_breakhis.core.files import atomic_write_text
from medgemma_breakhis.core.logs import configure_logging
from medgemma_breakhis.core.params import add_override_argument
from medgemma_breakhis.evaluate.metrics import HEADLINE
from medgemma_breakhis.track.store import experiment_id

logger = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16")
COMPARED = ("eight_class.accuracy", "eight_class.f1_weighted", "binary.accuracy", "binary.f1_malignant")
CPU_NOTE = (
    "No GPU here: fp16 mixed precision needs CUDA, so the fp16 experiment trains float16 base weights "
    "without autocast, and its 'precision that ran' row says so."
)


def run_experiment(name: str, precision: str, overrides: list[str]) -> int:
    """`dvc exp run --temp --force evaluate` with train.precision set; returns dvc's exit code instead of raising."""
    command = ["dvc", "exp", "run", "--temp", "--force", "--name", name, "-S", f"train.precision={precision}"]
    # evaluate with train and its inputs; the baseline (minutes of GPU at real size) tells nothing here
    command += [*(arg for override in overrides for arg in ("-S", override)), "evaluate"]
    logger.info("running %s", " ".join(command))
    return subprocess.run(command, check=False).returncode


def _latest_stage_run(client: mlflow.MlflowClient, experiment: str, dvc_exp_name: str, stage: str) -> Run | None:
    # compared here, not in the filter string: a name may hold any quote
    runs = client.search_runs([experiment], f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"])
    return next((run for run in runs if run.data.tags.get("dvc_exp_name") == dvc_exp_name), None)


def _history(client: mlflow.MlflowClient, run: Run | None, key: str) -> list[float]:
    history = client.get_metric_history(run.info.run_id, key) if run is not None else []
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_column(dvc_exp_name: str, exit_code: int) -> dict[str, str]:
    """One precision's column of the comparison, from what MLflow holds for its experiment: row label → cell."""
    experiment = experiment_id()  # which sets the tracking URI the client reads
    client = mlflow.MlflowClient()
    train = _latest_stage_run(client, experiment, dvc_exp_name, "train")
    evaluate = _latest_stage_run(client, experiment, dvc_exp_name, "evaluate")
    loss, grad_norm = _history(client, train, "loss"), _history(client, train, "grad_norm")
    finite = [v for v in loss if math.isfinite(v)]
    train_metrics = train.data.metrics if train else {}
    train_tags = train.data.tags if train else {}
    eval_metrics = evaluate.data.metrics if evaluate and evaluate.info.status == "FINISHED" else {}
    wall = (train.info.end_time - train.info.start_time) / 1000 if train and train.info.end_time else None
    if train is None:
        outcome = f"no train run in MLflow (dvc exited {exit_code})"
    elif "diverged_at_step" in train_tags:
        outcome = f"diverged at step {train_tags['diverged_at_step']} (non-finite loss)"
    elif train.info.status != "FINISHED":
        outcome = f"{train.info.status.lower()}: {train_tags.get('failure_reason', 'no reason recorded')}"
    else:
        outcome = "finished"
    column = {
        "DVC experiment": dvc_exp_name,
        "training": outcome,
        "precision that ran": train_tags.get("precision_ran", "n/a"),
        "loss: first → last (min)": f"{finite[0]:.3f} → {loss[-1]:.3f} (min {min(finite):.3f})"
        if finite
        else "no finite loss logged",
        "optimizer steps logged": str(len(loss)),
        "non-finite loss steps": str(sum(not math.isfinite(v) for v in loss)),
        "non-finite grad-norm steps": str(sum(not math.isfinite(v) for v in grad_norm)),
        # fp16's loss scaler drops a step whose gradients overflowed (typically the first ones) instead of diverging
        "optimizer steps skipped by the fp16 loss scaler": _number(train_metrics.get("skipped_optimizer_steps"), 0),
        "trainer runtime (s)": _number(train_metrics.get("train_runtime"), 1),
        "train stage wall time (s)": _number(wall, 1),
        "peak process RSS (GiB)": _number(train_metrics.get("peak_process_rss_gib"), 2),
        "peak CUDA memory allocated (GiB)": "n/a (ran on CPU)"
        if train_tags.get("device") == "cpu"
        else _number(train_metrics.get("peak_cuda_memory_allocated_gib"), 2),
    }
    for figure in (figure for figure in HEADLINE if figure.key in COMPARED):
        value = eval_metrics.get(figure.mlflow_name)
        column[f"test {figure.label}"] = "not evaluated" if value is None else _number(value)
    return column


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_override_argument(parser)  # applied to both experiments
    parser.add_argument("--out", type=Path, default=Path("reports/precision_comparison.md"), help="markdown to write")
    args = parser.parse_args()
    configure_logging()
    if any(override.startswith("train.precision=") for override in args.overrides):
        parser.error("train.precision is what this command varies; do not set it")
    notes = [] if torch.cuda.is_available() else [CPU_NOTE]
    for note in notes:
        logger.warning(note)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    columns = {}
    for precision in PRECISIONS:
        name = f"precision-{stamp}-{precision}"
        columns[precision] = summary_column(name, run_experiment(name, precision, args.overrides))
    table = pd.DataFrame(columns).to_markdown(disable_numparse=True)
    overrides = " ".join(f"-S {o}" for o in args.overrides) or "none"
    heading = f"# bf16 vs fp16 ({stamp})\n\nOther params: params.yaml, overrides: {overrides}"
    report = "\n\n".join([heading, table, *notes]) + "\n"
    atomic_write_text(args.out, report)
    print(report)
    print(f"saved to {args.out}")
    outcomes = [column["training"] for column in columns.values()]
    if not all(outcome == "finished" or outcome.startswith("diverged") for outcome in outcomes):
        raise SystemExit("a run failed for a reason other than divergence; see the table and the dvc output above")


if __name__ == "__main__":
    main()
