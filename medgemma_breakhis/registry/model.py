"""The registered model: each evaluated adapter as a version of one MLflow model, and the pyfunc classifier it is: image
files' bytes (or base64 text) in, OUTPUT_COLUMNS out, null where a column has no value (docs/model-registry.md)."""

import base64
import importlib.metadata
import io
import logging
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from peft import PeftModel
from PIL import Image, UnidentifiedImageError
from transformers import AutoProcessor, PreTrainedModel, ProcessorMixin

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.core.files import sha256
from medgemma_breakhis.core.params import ModelParams, Params, Precision
from medgemma_breakhis.data.breakhis import CLASS_NAMES, IMAGE_SIZE
from medgemma_breakhis.evaluate.metrics import PROBABILITY_COLUMNS, binary_prediction, malignant_probability
from medgemma_breakhis.evaluate.scoring import score_images
from medgemma_breakhis.model.load import LoadedModelInfo, ModelLoadError, load_base_model
from medgemma_breakhis.model.prompt import PROMPT

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
TEXT_COLUMNS = ["predicted_class", "predicted_binary", "error", "warning"]
OUTPUT_COLUMNS = [*PROBABILITY_COLUMNS, "malignant_probability", *TEXT_COLUMNS]
# What microscope cameras and slide scanners export; PIL's other plugins are never tried on an untrusted file.
ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
# From the header: far above any field of view (BreakHis: 0.3 megapixels), far below PIL's decompression-bomb limit.
MAX_PIXELS = 40_000_000
MIN_SIDE = 32
# The images of one call as sent (MLflow's scoring server has no limit): 40 megapixels of uncompressed 16-bit RGB fit.
MAX_REQUEST_BYTES = 256 * 2**20


def image_bytes(value: object) -> bytes:
    """A row's image bytes: as sent, or decoded from base64 text (MLflow decodes it in `dataframe_*` formats only)."""
    data = value if isinstance(value, bytes) else str(value).encode()
    try:  # an image file's own bytes are never base64 text
        return base64.b64decode(data) if re.fullmatch(rb"[A-Za-z0-9+/\s]*=*\s*", data) else data
    except ValueError:  # base64's letters, but not base64: decode_image says what it is
        return data


def decode_image(data: bytes, fit: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """The RGB image in `data`, no larger than `fit` (width, height: shrunk as the processor resizes), and its warnings;
    or DataError: not ACCEPTED_FORMATS, a size outside [MIN_SIDE, MAX_PIXELS] by the header, float pixels, corrupt."""
    if not data:
        raise DataError("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:  # reads the header only
            (width, height), mode, pages = image.size, image.mode, getattr(image, "n_frames", 1)
            if width * height > MAX_PIXELS:
                raise DataError(
                    f"{width}x{height} pixels is more than {MAX_PIXELS:,} ({image.format} header), refused before "
                    "decoding: cut the slide into fields of view (BreakHis images are 700x460)"
                )
            if min(width, height) < MIN_SIDE:
                raise DataError(f"{width}x{height} pixels is smaller than {MIN_SIDE}x{MIN_SIDE}: not a field of view")
            if mode == "F":  # no range to scale from
                raise DataError("floating-point pixels: save the image with 8 or 16 bits per channel")
            image.draft("RGB", fit)  # a JPEG: decoded at 1/2 to 1/8 of its size where that still covers `fit`
            if mode.startswith("I"):  # 16-bit gray to 8 bits, as PIL reads 16-bit colour: convert("RGB") clips to white
                image = image.convert("I").point(lambda value: value / 257)
            rgb = image.convert("RGB")
            if fit and rgb.size != (shrunk := (min(rgb.width, fit[0]), min(rgb.height, fit[1]))):
                rgb = rgb.resize(shrunk, Image.Resampling.BILINEAR)  # what Gemma 3's processor does, a side at a time
    except UnidentifiedImageError:
        raise DataError(f"not an image in a format read here ({', '.join(ACCEPTED_FORMATS)})") from None
    except Image.DecompressionBombError as err:  # PIL's own guard, checked on opening: far larger than MAX_PIXELS
        raise DataError(f"refused before decoding: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:  # how PIL's plugins report a truncated or corrupt file
        raise DataError(f"corrupt or truncated image ({type(err).__name__}: {err})") from None
    first_only = f"{pages} pages or frames: classified on the first" if pages > 1 else ""
    return rgb, "; ".join(filter(None, [unusual(rgb, mode, (width, height)), first_only]))


def unusual(image: Image.Image, mode: str, size: tuple[int, int]) -> str:
    """Why an image of `size` read as `mode` is far from BreakHis's 700x460 RGB H&E, or "" (checked on `image`)."""
    (width, height), pixels = size, np.asarray(image.reduce(max(1, min(image.size) // 64)), dtype=np.int16)
    reasons = {
        f"{width}x{height} pixels": not (0.5 <= width / IMAGE_SIZE[0] <= 2 and 0.5 <= height / IMAGE_SIZE[1] <= 2),
        f"{mode} pixels": mode not in ("RGB", "L"),
        "grayscale": not np.ptp(pixels, axis=2).any(),  # red, green and blue equal everywhere, whatever the mode
        "mostly dark": (pixels.mean(axis=2) < 50).mean() > 1 / 3,  # a slide is back-lit: its glass is bright
    }
    found = ", ".join(reason for reason, far in reasons.items() if far)
    return found and f"unlike the 700x460 RGB H&E images it was trained on ({found}): its answer may mean little"


def classify(model: PreTrainedModel, processor: ProcessorMixin, images: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """A row of OUTPUT_COLUMNS per image in column `image`, scored in groups of at most MAX_PIXELS pixels or refused
    with why (`error`); more than MAX_REQUEST_BYTES in all is refused whole."""
    if (sent := sum(map(len, images[IMAGE_COLUMN]))) > MAX_REQUEST_BYTES:  # as sent (MLflow refuses a null before)
        raise mlflow.MlflowException.invalid_parameter_value(
            f"{sent / 2**20:.0f} MiB of images in one request: at most {MAX_REQUEST_BYTES // 2**20} MiB, send fewer"
        )
    table = pd.DataFrame(index=range(len(images)), columns=OUTPUT_COLUMNS).assign(error="", warning="")
    fit = (processor.image_processor.size.width, processor.image_processor.size.height)
    group = batch_size * max(1, MAX_PIXELS // (batch_size * fit[0] * fit[1]))  # images of at most `fit` each
    for start in range(0, len(images), group):
        decoded = {}
        for row, data in enumerate(images[IMAGE_COLUMN].iloc[start : start + group], start):
            try:
                decoded[row], table.loc[row, "warning"] = decode_image(image_bytes(data), fit)
            except DataError as err:
                table.loc[row, "error"] = str(err)
        if decoded:
            probabilities = score_images(model, processor, list(decoded.values()), batch_size)
            scored = pd.DataFrame(probabilities, index=list(decoded), columns=PROBABILITY_COLUMNS)
            scored["malignant_probability"] = malignant_probability(scored)
            scored["predicted_class"] = [CLASS_NAMES[label] for label in probabilities.argmax(axis=1)]
            scored["predicted_binary"] = binary_prediction(scored)
            table.loc[scored.index, scored.columns] = scored
    return table.astype(object).where(table.notna(), None)


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
    outputs=Schema([ColSpec("string" if name in TEXT_COLUMNS else "double", name) for name in OUTPUT_COLUMNS]),
)


def load_adapter_model(
    adapter_dir: Path, base: ModelParams, precision: Precision, resolved_revision: str | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The base model with the adapter applied unmerged (as `evaluate` scores), and the processor saved with the
    adapter. With `resolved_revision`, the base model must be the one the adapter was trained on."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"no LoRA adapter in {adapter_dir} (adapter_config.json is missing)")
    if resolved_revision and re.fullmatch(r"[0-9a-f]{40}", resolved_revision):  # a hub commit, else a weights digest
        base = ModelParams(id=base.id, revision=resolved_revision, attn_implementation=base.attn_implementation)
    model, _, info = load_base_model(base, precision)
    if resolved_revision and info.resolved_revision != resolved_revision:
        raise ModelLoadError(
            f"base model {base.id} loaded as {info.resolved_revision}, but the adapter in {adapter_dir} was trained "
            f"on {resolved_revision}: its scores would mean nothing. Load the base model it was trained on."
        )
    return PeftModel.from_pretrained(model, adapter_dir), AutoProcessor.from_pretrained(adapter_dir)


class AdapterClassifier(mlflow.pyfunc.PythonModel):
    """The registered model; `load_context` loads the base model and the adapter artifact as the model config says."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config
        if config["prompt"] != PROMPT or list(config["class_names"]) != list(CLASS_NAMES):
            raise ModelLoadError(
                "this model was registered with another prompt or other classes than this code scores with; "
                "serve it with the code registered with it (mlflow models serve)"
            )
        base = ModelParams(
            id=config["base_model_id"],
            revision=config["base_model_revision"],
            attn_implementation=config["attn_implementation"],
        )
        self.model, self.processor = load_adapter_model(
            Path(context.artifacts["adapter"]), base, config["precision"], config["base_model_resolved_revision"]
        )
        self.batch_size = int(config["batch_size"])

    def predict(self, context: object, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return classify(self.model, self.processor, model_input, self.batch_size)


PACKAGE = "medgemma_breakhis"
# What MLflow runs to load the model ("models from code": nothing is unpickled); the package comes with the model.
MODEL_CODE = f"""from mlflow.models import set_model

from {PACKAGE}.registry.model import AdapterClassifier

set_model(AdapterClassifier())
"""
# What the classifier's modules import, pinned as installed here, for `mlflow models serve --env-manager virtualenv`.
SERVING_DISTRIBUTIONS = (  # noqa: SIM905 - names, read as a sentence
    "mlflow torch transformers tokenizers safetensors huggingface_hub peft trl accelerate pillow numpy pandas scipy "
    "scikit-learn tqdm ruamel.yaml pydantic"
).split()


def register_adapter(
    run_id: str, adapter_dir: Path, params: Params, base: LoadedModelInfo, md5: str, headline: dict[str, float]
) -> None:
    """Log the adapter and this package's code as a pyfunc model of run `run_id` and register it, with the `headline`
    metrics, as a new version of `params.registry.model_name`; an adapter registered before is only linked to them."""
    client, name = mlflow.MlflowClient(), params.registry.model_name
    origin, digest = client.get_run(run_id).data.tags, sha256(adapter_dir / "adapter_model.safetensors")
    # only the params' name (no quote allowed) and a digest go into the filter
    if found := client.search_model_versions(f"name = '{name}' and tags.adapter_sha256 = '{digest}'"):
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics(headline, model_id=found[0].source.removeprefix("models:/"))  # sqlite keeps no model_id
        logger.info("%s is version %s of %s already: its new metrics are linked", adapter_dir, found[0].version, name)
        return
    tags = {key: origin[key] for key in ("dvc_exp_name", "git_commit", "git_dirty")} | {
        "adapter_sha256": digest,
        "adapter_dvc_md5": md5,
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
            model_config={  # the base model, loaded by id and revision and checked against the resolved one
                "base_model_id": params.model.id,
                "base_model_revision": params.model.revision,
                "base_model_resolved_revision": base.resolved_revision,
                "attn_implementation": params.model.attn_implementation,
                "precision": params.eval.precision,
                "batch_size": params.eval.batch_size,
                "prompt": PROMPT,
                "class_names": list(CLASS_NAMES),
            },
            code_paths=[str(code)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({IMAGE_COLUMN: [example.getvalue()]}),
            pip_requirements=[f"{name}=={importlib.metadata.version(name)}" for name in SERVING_DISTRIBUTIONS],
            params={key: str(value) for key, value in params.flat().items()},
            tags=tags,
            model_type="image classifier (LoRA adapter on a vision-language model)",
        )
        mlflow.log_metrics(headline, model_id=info.model_id)
    for key, value in headline.items():  # `metric.eight_class_accuracy`: `0.875 [0.613, 1.000]`
        if not key.endswith(("_ci95_low", "_ci95_high")):
            low, high = headline.get(f"{key}_ci95_low"), headline.get(f"{key}_ci95_high")
            tags[f"metric.{key}"] = f"{value:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")
    version = mlflow.register_model(info.model_uri, name, tags=tags).version
    labels = (("8-class accuracy", "eight_class_accuracy"), ("binary ROC-AUC", "binary_roc_auc"))
    figures = ", ".join(f"{label} {headline[key]:.3f}" for label, key in labels if key in headline)
    experiment = origin["dvc_exp_name"]
    kept = f"`dvc exp push origin {experiment}` keeps the experiment's own commit"
    if experiment == "workspace":
        kept = "commit the outputs (dvc.lock, metrics/) to keep them"
    description = (
        f"LoRA adapter of DVC experiment {experiment} on {params.model.id}, fold {params.split.fold} at "
        f"{params.split.magnification}X: {figures}. Made from git {origin['git_commit'][:12]}; {kept}."
    )
    client.update_model_version(name, version, description=description)
    logger.info("registered %s as version %s of model %s (models:/%s/%s)", adapter_dir, version, name, name, version)
