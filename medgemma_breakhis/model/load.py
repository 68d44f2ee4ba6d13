"""Where a `model.id` loads from (built-in, folder or hub), the checks before any weights load, and loading it."""

import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PretrainedConfig, PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from medgemma_breakhis.core.errors import ParamsError
from medgemma_breakhis.core.hub import ModelLoadError, hub_problem
from medgemma_breakhis.core.params import RANDOM_MEDGEMMA_ID, TINY_MODEL_ID, LoraParams, ModelParams, Precision
from medgemma_breakhis.model.builtin import DIGEST_FILE, random_medgemma_folder, tiny_model_folder, weights_digest

logger = logging.getLogger(__name__)

DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHAT_TEMPLATE_FILES = "chat_template.jinja, chat_template.json or the chat_template of tokenizer_config.json"


class NonFiniteError(FloatingPointError):
    """A loss or logits became NaN or infinite: the numbers overflowed their format or training diverged."""


def non_finite_advice(precision: Precision, param: str) -> str:
    """What to change when values stop being finite at `precision` (set by the params key `param`)."""
    if precision == "fp16":
        return (
            f"float16 overflows past 65,504, as Gemma 3 activations do (transformers#36822): "
            f"set {param}=bf16, which has float32's range"
        )
    return "the values diverged: lower train.learning_rate or train.max_grad_norm, and check the data"


@dataclass(frozen=True)
class LoadedModelInfo:
    model_id: str
    resolved_revision: str
    device: str
    dtype: str

    def tags(self, precision_ran: str) -> dict[str, str]:
        """MLflow tags of what was loaded and how it computed: the precision that ran, never the one requested."""
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
        return {
            "model_resolved_revision": self.resolved_revision,
            "device": self.device,
            "device_name": name,
            "weights_dtype": self.dtype,
            "precision_ran": precision_ran,
        }


class ModelSource(NamedTuple):
    """What `from_pretrained` loads for a model id: a folder, or a hub id at a revision (None for a folder)."""

    model: ModelParams
    location: str
    revision: str | None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    """The GPU if there is one (in a distributed run, this process's own), else the CPU."""
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")


def require_gpu_for(model: ModelParams) -> None:
    """Refuse, in one line, to load `medgemma-4b-random`'s weights without a GPU."""
    if model.id == RANDOM_MEDGEMMA_ID and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.id={RANDOM_MEDGEMMA_ID} is MedGemma 4B's size (4.3 billion parameters) for timing and sizing on "
            "a GPU, and no CUDA GPU is visible here: on a CPU, use model.id=tiny-gemma3"
        )


def resolve(model: ModelParams, weights: bool = True) -> ModelSource:
    """The source of `model`, a built-in built here (without `weights`: config and processor only, in seconds)."""
    if model.kind == "hub":
        return ModelSource(model, model.id, model.revision)
    if model.kind == "folder":
        folder = Path(model.id).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                f"model.id={model.id!r} is a local path, and no folder is there (from {Path.cwd()}); set model.id to "
                "the folder holding the model's config.json and weights, or to a hub id such as google/medgemma-4b-it"
            )
        return ModelSource(model, str(folder), None)
    if model.id == TINY_MODEL_ID:
        return ModelSource(model, str(tiny_model_folder()), None)
    if weights:
        require_gpu_for(model)
    return ModelSource(model, str(random_medgemma_folder(weights=weights)), None)


def _from_source(source: ModelSource, what: str, load: Callable[..., Any], **kwargs: Any) -> Any:
    """`load(location, revision=…, **kwargs)`, a hub failure (an OSError in transformers) turned into ModelLoadError."""
    try:
        return load(source.location, revision=source.revision, **kwargs)
    except OSError as err:
        where = f"model {source.model.id!r} from {source.location}: {err}"
        if source.revision is not None:
            where = hub_problem(source.model, err)
        raise ModelLoadError(f"could not load the {what} of {where}") from err


def model_config(model: ModelParams) -> PretrainedConfig:
    return _from_source(resolve(model, weights=False), "config", AutoConfig.from_pretrained)


def model_on_meta(config: PretrainedConfig) -> PreTrainedModel:
    """The model of `config` on PyTorch's meta device: every parameter's shape, no memory."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def load_processor(model: ModelParams, source: ModelSource | None = None) -> ProcessorMixin:
    """The model's processor, with its chat template (from `source`, else without resolving the weights)."""
    source = source or resolve(model, weights=False)
    processor = _from_source(source, "processor", AutoProcessor.from_pretrained)
    if processor.chat_template is None:  # a model saved by an older transformers keeps it in tokenizer_config.json
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    if processor.chat_template is None:
        raise ModelLoadError(
            f"model {source.model.id!r} has no chat template ({CHAT_TEMPLATE_FILES} in {source.location}), and the "
            "prompt is written in it: add the template of the model's chat format to the model's folder"
        )
    return processor


def check_model(model: ModelParams, lora: LoraParams | None = None) -> None:
    """Refuse, before any weights load, a model not loadable here, without a chat template, or unmatched by `lora`."""
    require_gpu_for(model)
    load_processor(model)
    if lora is not None:
        check_lora_targets(model, lora)


def check_lora_targets(model: ModelParams, lora: LoraParams) -> None:
    """ParamsError if `lora.target_modules` matches no module of the model, from its config alone."""
    skeleton = model_on_meta(model_config(model))
    try:
        get_peft_model(skeleton, LoraConfig(target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    except ValueError as err:
        raise ParamsError(
            f"params: lora.target_modules={lora.target_modules!r} matches no module of {model.id} ({err}); "
            "expected all-linear, or a regular expression over its module names"
        ) from err


def load_base_model(
    model: ModelParams, precision: Precision
) -> tuple[PreTrainedModel, ProcessorMixin, LoadedModelInfo]:
    """Model and processor through the Auto classes, in `precision`'s dtype, on the GPU if there is one."""
    source, target = resolve(model), device()
    loaded = _from_source(
        source,
        "weights",
        AutoModelForImageTextToText.from_pretrained,
        dtype=DTYPES[precision],
        attn_implementation=model.attn_implementation,
        # one process: spread over the GPUs there are; one of several (DDP): a whole copy on its own GPU
        device_map=None if target.type != "cuda" else "auto" if world_size() == 1 else {"": target.index},
    )
    processor = load_processor(model, source)
    if source.revision is not None:
        resolved = getattr(loaded.config, "_commit_hash", None) or "unknown"
    elif model.id == RANDOM_MEDGEMMA_ID:  # its digest, written at its build into this user's own model cache
        resolved = (Path(source.location) / DIGEST_FILE).read_text(encoding="utf-8")
        logger.warning("%s has random weights: its figures are for timing and memory only, never results", model.id)
    else:  # every other folder's weights are hashed as loaded: a digest file beside them is never trusted
        resolved = weights_digest(Path(source.location))
    info = LoadedModelInfo(model.id, resolved, str(loaded.device), str(DTYPES[precision]).removeprefix("torch."))
    logger.info("loaded %s (revision %s) on %s as %s", info.model_id, info.resolved_revision, info.device, info.dtype)
    return loaded, processor, info
