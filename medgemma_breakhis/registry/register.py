"""Every evaluated adapter as a version of one registered MLflow model (`registry.model_name`), with what it came
from and how it scored, to classify new images with, serve, promote and roll back (docs/model-registry.md)."""

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
MODEL_CODE = f"""from mlflow.models import set_model

from {PACKAGE}.registry.classifier import AdapterClassifier

set_model(AdapterClassifier())
"""
# The distributions the classifier's modules import, pinned at the versions installed here: what a fresh environment
# needs to serve the model (`mlflow models serve --env-manager virtualenv`).
SERVING_DISTRIBUTIONS = (  # noqa: SIM905 - names, read as a sentence
    "mlflow torch transformers tokenizers safetensors huggingface_hub peft trl accelerate pillow numpy pandas scipy "
    "scikit-learn tqdm ruamel.yaml pydantic"
).split()
# Version tags that say where a version came from (the run's own tags say more).
ORIGIN_TAGS = ("dvc_exp_name", "git_commit", "git_dirty")


def register_adapter(
    *,
    run_id: str,
    adapter_dir: Path,
    params: Params,
    base: LoadedModelInfo,
    adapter_md5: str | None,
    headline: dict[str, float],
) -> ModelInfo:
    """Log the adapter (weights and processor, never the base weights), this package's code and a blank input example
    as a pyfunc model of run `run_id`, register it as a new version of `params.registry.model_name`, log the
    `headline` metrics linked to it, and put them and the version's origin on the version (its page shows tags)."""
    name, origin = params.registry.model_name, mlflow.MlflowClient().get_run(run_id).data.tags
    tags = {key: origin[key] for key in ORIGIN_TAGS} | {
        "adapter_dvc_md5": adapter_md5 or "not in a dvc.lock (stage run outside DVC)",
        "base_model_id": base.model_id,
        "base_model_resolved_revision": base.resolved_revision,
    }
    example = io.BytesIO()
    Image.new("RGB", IMAGE_SIZE, (230, 200, 215)).save(example, format="PNG")  # no patient's image in the model
    with tempfile.TemporaryDirectory(prefix="registered-model-") as staging, mlflow.start_run(run_id=run_id):
        (Path(staging) / "model.py").write_text(MODEL_CODE, encoding="utf-8")
        code = Path(staging) / "code" / PACKAGE  # what the model runs when served, whatever the repository holds later
        shutil.copytree(Path(__file__).parents[1], code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=Path(staging) / "model.py",
            artifacts={"adapter": str(adapter_dir)},
            model_config=model_config(
                params.model, base.resolved_revision, params.eval.precision, params.eval.batch_size
            ),
            code_paths=[str(code)],
            signature=signature(),
            input_example=pd.DataFrame({IMAGE_COLUMN: [example.getvalue()]}),
            pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in SERVING_DISTRIBUTIONS],
            registered_model_name=name,
            params={key: str(value) for key, value in params.flat().items()},
            tags=tags,
            model_type="image classifier (LoRA adapter on a vision-language model)",
        )
        mlflow.log_metrics(headline, model_id=info.model_id)
    version, client = str(info.registered_model_version), mlflow.MlflowClient()
    for key, value in headline.items():  # `metric.eight_class_accuracy`: `0.875 [0.613, 1.000]`
        if not key.endswith(("_ci95_low", "_ci95_high")):
            low, high = headline.get(f"{key}_ci95_low"), headline.get(f"{key}_ci95_high")
            tags[f"metric.{key}"] = f"{value:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    labels = (("8-class accuracy", "eight_class_accuracy"), ("binary ROC-AUC", "binary_roc_auc"))
    figures = ", ".join(f"{label} {headline[key]:.3f}" for label, key in labels if key in headline)
    description = (
        f"LoRA adapter of DVC experiment {origin['dvc_exp_name']} (git {origin['git_commit'][:12]}) on "
        f"{params.model.id}, fold {params.split.fold} at {params.split.magnification}X: {figures}"
    )
    client.update_model_version(name, version, description=description)
    logger.info("registered %s as version %s of model %s (models:/%s/%s)", adapter_dir, version, name, name, version)
    return info
