"""The registered versions of the fine-tuned classifier: list them, move an alias (promote or roll back), serve one, or
open the MLflow UI on the runs: make models, promote, serve, mlflow-ui (docs/model-registry.md)."""

import argparse
import logging
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from medgemma_breakhis.core.errors import ExpectedError
from medgemma_breakhis.core.files import sha256
from medgemma_breakhis.core.logs import configure_logging, shown_uri
from medgemma_breakhis.core.params import add_override_argument, load_params
from medgemma_breakhis.core.stage import stage_entry
from medgemma_breakhis.track.store import EXPERIMENT_NAME, open_store

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "champion"
LISTED_METRICS = (("8-class acc", "eight_class_accuracy"), ("binary ROC-AUC", "binary_roc_auc"))
WORKSPACE_ADAPTER = Path("models/adapter")  # dvc.yaml's adapter_dir, from the repository's root (where make runs)


class ModelNotFound(ExpectedError):
    """No registered model, version, alias or experiment matches; the message says what exists and how to make one."""


def versions(name: str) -> list[ModelVersion]:
    """Every version of model `name` (params.py allows no quote in it), newest first; ModelNotFound if there is none."""
    found = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    if not found:
        raise ModelNotFound(
            f"no version of model {name!r} in the MLflow store {shown_uri(mlflow.get_tracking_uri())}: `evaluate` "
            "registers one per run (make demo, dvc repro, dvc exp run)"
        )
    return sorted(found, key=lambda version: int(version.version), reverse=True)


def model_uri(name: str, choice: str | None = None) -> str:
    """`choice` (an MLflow model URI or the DVC experiment that registered the version), else @champion or the newest;
    a warning where the workspace adapter is no registered version."""
    if choice is not None and ":/" in choice:
        return choice
    listed = versions(name)
    if choice is not None:  # compared here rather than in a filter string: an experiment's name may hold any quote
        if found := next((version for version in listed if version.tags.get("dvc_exp_name") == choice), None):
            return f"models:/{name}/{found.version}"
        why = f"no version of model {name!r} came from a DVC experiment named {choice!r}, and no folder has that name"
        raise ModelNotFound(f"{why}; `make models` lists each version's experiment")
    champion = mlflow.MlflowClient().get_registered_model(name).aliases.get(DEFAULT_ALIAS)
    version = champion or listed[0].version
    uri = f"models:/{name}@{DEFAULT_ALIAS}" if champion else f"models:/{name}/{version}"
    adapter = WORKSPACE_ADAPTER / "adapter_model.safetensors"
    if adapter.is_file() and sha256(adapter) not in {each.tags.get("adapter_sha256") for each in listed}:
        unregistered = "%s is no version of %s (did its registration fail? `make register`): using %s, version %s"
        logger.warning(unregistered, adapter.parent, name, uri, version)
    elif not champion:
        logger.info("model %s version %s, the newest: no version has the alias %s", name, version, DEFAULT_ALIAS)
    return uri


def version_table(name: str) -> pd.DataFrame:
    client, listed, rows = mlflow.MlflowClient(), versions(name), []
    named = client.get_registered_model(name).aliases  # the versions search_model_versions returns carry none (sqlite)
    for version in listed:
        metrics, model_id = {}, version.model_id or version.source.removeprefix("models:/")
        if model_id.startswith("m-"):  # the logged model it was registered from, which MLflow 3 records as its source
            metrics = {metric.key: metric.value for metric in client.get_logged_model(model_id).metrics or []}
        rows.append(
            {
                "version": str(version.version),
                "aliases": ", ".join(alias for alias, number in named.items() if number == version.version),
                "registered": pd.Timestamp(version.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M"),
                "DVC experiment": version.tags.get("dvc_exp_name", ""),
                "git commit": version.tags.get("git_commit", "")[:10],
                **{label: f"{metrics[key]:.3f}" if key in metrics else "n/a" for label, key in LISTED_METRICS},
            }
        )
    return pd.DataFrame(rows)


def promote(name: str, version: str, alias: str) -> str:
    """Point `alias` at `version`; returns what changed, and how to undo it."""
    listed = [str(v.version) for v in versions(name)]
    if version not in listed:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its versions: {', '.join(listed)}")
    previous = mlflow.MlflowClient().get_registered_model(name).aliases.get(alias)
    try:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    except MlflowException as err:  # e.g. an alias MLflow reserves (`latest`, `v3`)
        raise ExpectedError(f"cannot set alias {alias!r}: {err.message}") from None
    if previous is None:
        return f"{name}@{alias} is version {version} (no version had it before)"
    if str(previous) == version:
        return f"{name}@{alias} was version {version} already"
    undo = f"make promote VERSION={previous} ALIAS={alias}"
    return f"{name}@{alias}: version {previous} -> {version} (to roll back: {undo})"


def training_view_url(server: str) -> str:
    """The experiment's runs in MLflow's UI at `server`, its GenAI / Model training switch set to Model training."""
    experiment = mlflow.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        raise ModelNotFound(f"no experiment {EXPERIMENT_NAME!r} in {shown_uri(mlflow.get_tracking_uri())}: make demo")
    return f"{server.rstrip('/')}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"


def run_ui(uri: str, port: int) -> None:
    """mlflow ui of `uri` on 127.0.0.1, one worker, no job runner (docs/model-registry.md), its link once it answers."""
    link = training_view_url(f"http://127.0.0.1:{port}")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise ExpectedError(f"port {port} is taken on 127.0.0.1: stop its server, or make mlflow-ui PORT=<another>")
    ui = ["mlflow", "ui", "--backend-store-uri", uri, "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    process = subprocess.Popen(ui, env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    while process.poll() is None:
        try:
            urllib.request.urlopen(link, timeout=5).close()
        except OSError:  # not answering yet
            time.sleep(0.5)
        else:
            print(f"Open {link} (Ctrl-C stops the UI)", flush=True)
            process.wait()
    raise SystemExit(process.returncode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every version, newest first, with its aliases, origin and headline metrics")
    promoting = commands.add_parser("promote", help="point an alias at a version (promote, or roll back)")
    promoting.add_argument("version", help="the version number, as `make models` lists it")
    promoting.add_argument("--alias", default=DEFAULT_ALIAS, help=f"default: {DEFAULT_ALIAS}")
    serving = commands.add_parser("serve", help="mlflow models serve, on this machine only (127.0.0.1)")
    serving.add_argument("--model", help="an MLflow model URI or a DVC experiment; default: @champion, else the newest")
    serving.add_argument("--port", type=int, default=5001)
    viewing = commands.add_parser("ui", help="mlflow ui of the repository's store on 127.0.0.1, opened on the runs")
    viewing.add_argument("--port", type=int, default=5000)
    add_override_argument(parser)
    args = parser.parse_args(argv)
    configure_logging()
    name = load_params(overrides=args.overrides).registry.model_name
    open_store()  # which exports MLFLOW_TRACKING_URI, for the server too
    uri = mlflow.get_tracking_uri()
    if args.command == "list":
        print(f"Model {name} in {shown_uri(uri)}")
        print(version_table(name).to_string(index=False))
    elif args.command == "promote":
        print(promote(name, args.version, args.alias))
    elif args.command == "ui" and not uri.startswith("sqlite:"):  # a team server has its own UI
        print(f"Open {training_view_url(shown_uri(uri))}")
    elif args.command == "ui":
        run_ui(uri, args.port)
    else:
        uri = model_uri(name, args.model)
        logger.info("serving %s on http://127.0.0.1:%d/invocations", uri, args.port)
        serve = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1"]
        os.execvp("mlflow", [*serve, "-p", str(args.port)])  # the server in this process: Ctrl-C stops it


if __name__ == "__main__":
    stage_entry(main)
