"""Every evaluated adapter as a version of one registered MLflow model (`registry.model_name`), with what it came
from and how it scored, so a team can classify new images with it, serve it, promote it and roll it back
(docs/model-registry.md).

`evaluate` registers the model because it has everything a version should carry: the adapter DVC has just hashed
(`train`'s lock entry), the test-set metrics, and a base model it has actually loaded.
"""

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

from medgemma_breakhis.classifier import IMAGE_COLUMN, model_config, signature
from medgemma_breakhis.modeling import LoadedModelInfo
from medgemma_breakhis.params import Params, to_flat_dict

logger = logging.getLogger(__name__)

PACKAGE = "medgemma_breakhis"
# What MLflow runs to load the model ("models from code": nothing is unpickled). The classifier's module comes with
# the model, in the code snapshot.
MODEL_CODE = f'''"""The registered MedGemma BreakHis classifier: {PACKAGE}/classifier.py (with this model's code)."""

from mlflow.models import set_model

from {PACKAGE}.classifier import AdapterClassifier

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
)
# Version tags that say where a version came from (the run's own tags say more).
ORIGIN_TAGS = ("dvc_exp_name", "git_commit", "git_dirty")


def pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in SERVING_DISTRIBUTIONS]


def code_snapshot(folder: Path) -> Path:
    """This package's source, copied into `folder`/medgemma_breakhis: the code the registered model runs when served
    (`mlflow models serve` puts it first on the path), whatever the repository holds later."""
    package = folder / PACKAGE
    shutil.copytree(Path(__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def example_input() -> pd.DataFrame:
    """A blank field of view in BreakHis's size and format: the model's input example holds no patient's image."""
    buffer = io.BytesIO()
    Image.new("RGB", (700, 460), (230, 200, 215)).save(buffer, format="PNG")
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
    adapter_dir: Path,
    params: Params,
    base: LoadedModelInfo,
    origin: dict[str, str],
    adapter_md5: str | None,
    headline: dict[str, float],
) -> ModelInfo:
    """Log the adapter as a pyfunc model in the active run, register it as a new version of
    `params.registry.model_name`, and log the `headline` metrics to the run, linked to the model.

    Logged: the adapter folder (weights and processor), the model config (base model id and resolved revision,
    prompt, class names, precision), the code snapshot, a signature and input example, pinned requirements; never the
    base weights. MLflow loads the logged model once to check the input example against the signature.
    """
    name = params.registry.model_name
    tags = {key: origin[key] for key in ORIGIN_TAGS} | {
        "adapter_dvc_md5": adapter_md5 or "not in a dvc.lock (stage run outside DVC)",
        "base_model_id": base.model_id,
        "base_model_resolved_revision": base.resolved_revision,
    }
    with tempfile.TemporaryDirectory(prefix="registered-model-") as staging:
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
            params={key: str(value) for key, value in to_flat_dict(params).items()},
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
