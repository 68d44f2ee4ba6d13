"""Every evaluated adapter as a version of one registered MLflow model (`registry.model_name`), with what it came
from and how it scored, to classify new images with, serve, promote and roll back (docs/model-registry.md)."""

from __future__ import annotations

import importlib.metadata
import io
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models.model import ModelInfo
from PIL import Image

from medgemma_breakhis.core.params import Params
from medgemma_breakhis.data.breakhis import IMAGE_SIZE
from medgemma_breakhis.model.load import LoadedModelInfo
from medgemma_breakhis.registry.classifier import IMAGE_COLUMN, model_config, signature

logger = logging.getLogger(__name__)

PACKAGE = "medgemma_breakhis"
# What MLflow runs to load the model ("models from code": nothing is unpickled); the package comes with the model.
MODEL_CODE = f'''"""The registered MedGemma BreakHis classifier: {PACKAGE}/registry/classifier.py (with this model's code)."""

from mlflow.models import set_model

from {PACKAGE}.registry.classifier import AdapterClassifier

set_model(AdapterClassifier())
'''
# The distributions the classifier's modules import, pinned at the versions installed here: what a fresh environment
# needs to serve the model (`mlflow models serve --env-manager virtualenv`).
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "peft",
    "trl",
    "accelerate",
    "pillow",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "tqdm",
    "ruamel.yaml",
    "pydantic",
)
# Version tags that say where a version came from (the run's own tags say more).
ORIGIN_TAGS = ("dvc_exp_name", "git_commit", "git_dirty")


def pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in SERVING_DISTRIBUTIONS]


def code_snapshot(folder: Path) -> Path:
    """This package's source, copied into `folder`/medgemma_breakhis: the code the registered model runs when served
    (`mlflow models serve` puts it first on the path), whatever the repository holds later."""
    package = folder / PACKAGE
    shutil.copytree(Path(__file__).parents[1], package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def example_input() -> pd.DataFrame:
    """A blank field of view in BreakHis's size and format: the model's input example holds no patient's image."""
    buffer = io.BytesIO()
    Image.new("RGB", IMAGE_SIZE, (230, 200, 215)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def metric_tags(headline: dict[str, float]) -> dict[str, str]:
    """The headline metrics as version tags (`metric.eight_class_accuracy`: `0.875 [0.613, 1.000]`): MLflow's
    registry keeps no metrics on a version, and its page shows tags."""
    tags = {}
    for key, value in headline.items():
        if key.endswith(("_ci95_low", "_ci95_high")):
            continue
        low, high = headline.get(f"{key}_ci95_low"), headline.get(f"{key}_ci95_high")
        tags[f"metric.{key}"] = f"{value:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")
    return tags


def version_description(params: Params, origin: dict[str, str], headline: dict[str, float]) -> str:
    figures = ", ".join(
        f"{label} {headline[key]:.3f}"
        for label, key in (("8-class accuracy", "eight_class_accuracy"), ("binary ROC-AUC", "binary_roc_auc"))
        if key in headline
    )
    return (
        f"LoRA adapter of DVC experiment {origin['dvc_exp_name']} (git {origin['git_commit'][:12]}) on "
        f"{params.model.id}, fold {params.split.fold} at {params.split.magnification}X: {figures}"
    )


def register_adapter(
    *,
    run_id: str,
    adapter_dir: Path,
    params: Params,
    base: LoadedModelInfo,
    adapter_md5: str | None,
    headline: dict[str, float],
) -> ModelInfo:
    """Log the adapter (weights and processor, never the base weights) as a pyfunc model of run `run_id`, register it
    as a new version of `params.registry.model_name`, and log the `headline` metrics to the run, linked to it."""
    name = params.registry.model_name
    origin = mlflow.MlflowClient().get_run(run_id).data.tags
    tags = {key: origin[key] for key in ORIGIN_TAGS} | {
        "adapter_dvc_md5": adapter_md5 or "not in a dvc.lock (stage run outside DVC)",
        "base_model_id": base.model_id,
        "base_model_resolved_revision": base.resolved_revision,
    }
    with tempfile.TemporaryDirectory(prefix="registered-model-") as staging, mlflow.start_run(run_id=run_id):
        model_code = Path(staging) / "model.py"
        model_code.write_text(MODEL_CODE, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model_code,
            artifacts={"adapter": str(adapter_dir)},
            model_config=model_config(
                params.model, base.resolved_revision, params.eval.precision, params.eval.batch_size
            ),
            code_paths=[str(code_snapshot(Path(staging) / "code"))],
            signature=signature(),
            input_example=example_input(),
            pip_requirements=pinned_requirements(),
            registered_model_name=name,
            params={key: str(value) for key, value in params.flat().items()},
            tags=tags,
            model_type="image classifier (LoRA adapter on a vision-language model)",
        )
        mlflow.log_metrics(headline, model_id=info.model_id)
    version = info.registered_model_version
    client = mlflow.MlflowClient()
    for key, value in (tags | metric_tags(headline)).items():
        client.set_model_version_tag(name, str(version), key, value)
    client.update_model_version(name, str(version), description=version_description(params, origin, headline))
    logger.info("registered %s as version %s of model %s (models:/%s/%s)", adapter_dir, version, name, name, version)
    return info
