"""Loading the base model and processor (MedGemma from the hub, a local copy, or a built-in model), and the checks
that refuse, in seconds and before any weights load, a model that cannot be trained or scored as the params say."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from medgemma_breakhis.distributed import local_rank, world_size
from medgemma_breakhis.model_source import (
    RANDOM_MEDGEMMA_ID,
    ModelLoadError,
    ModelSource,
    recorded_revision,
    require_gpu_for,
    resolve,
)
from medgemma_breakhis.params import LoraParams, ModelParams, ParamsError, Precision

logger = logging.getLogger(__name__)

DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Where transformers looks for a processor's chat template, for the message when there is none.
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
    """What was actually loaded, recorded with the results."""

    model_id: str
    requested_revision: str
    resolved_revision: str
    device: str
    dtype: str


def device() -> torch.device:
    """The GPU if there is one (in a distributed run, this process's own), else the CPU."""
    return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")


def _hub_error_advice(model_id: str) -> str:
    from huggingface_hub import get_token

    token = "a Hugging Face token was found" if get_token() else "no Hugging Face token was found"
    return (
        f"{token}. {model_id} may be gated: accept its terms on https://huggingface.co/{model_id} with your "
        "account, then set HF_TOKEN or run `hf auth login`, and check network access (or HF_HUB_OFFLINE with a "
        "filled cache). To run offline without it, use model.id=tiny-gemma3."
    )


def _from_source(source: ModelSource, what: str, load: Callable[..., Any], **kwargs: Any) -> Any:
    """`load(location, revision=revision, **kwargs)` (a `from_pretrained`), with a hub failure (transformers turns
    HTTP, gating and offline failures into OSError) reported as a ModelLoadError that says what to set."""
    try:
        return load(source.location, revision=source.revision, **kwargs)
    except OSError as err:
        if source.kind != "hub":
            raise ModelLoadError(
                f"could not load the {what} of model {source.model_id!r} from {source.location}: {err}"
            ) from err
        raise ModelLoadError(
            f"could not load the {what} of model {source.model_id!r} at revision {source.revision!r}: {err}\n"
            f"{_hub_error_advice(source.model_id)}"
        ) from err


def model_config(params: ModelParams) -> PretrainedConfig:
    """The model's config, without its weights (a built-in model is built without them)."""
    source = resolve(params.id, params.revision, weights=False)
    return _from_source(source, "config", AutoConfig.from_pretrained)


def model_on_meta(config: PretrainedConfig) -> PreTrainedModel:
    """The model of `config` on PyTorch's meta device: every parameter's shape, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _load_processor(source: ModelSource) -> ProcessorMixin:
    processor = _from_source(source, "processor", AutoProcessor.from_pretrained)
    if processor.chat_template is None:
        # A model saved with an older transformers keeps its template only in tokenizer_config.json, which the
        # tokenizer reads and the processor does not.
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    if processor.chat_template is None:
        raise ModelLoadError(
            f"model {source.model_id!r} has no chat template ({CHAT_TEMPLATE_FILES} in {source.location}), and the "
            "prompt is written in it: add the template of the model's chat format to the model's folder"
        )
    return processor


def load_processor(params: ModelParams) -> ProcessorMixin:
    """The model's processor, with its chat template (which the prompt is written in), without the weights."""
    return _load_processor(resolve(params.id, params.revision, weights=False))


def check_model(params: ModelParams, lora: LoraParams | None = None) -> None:
    """Refuse, in seconds and before any weights load, a model that cannot be used as the params say: not loadable
    here, without a chat template, or (with `lora`) with `lora.target_modules` matching none of its modules."""
    require_gpu_for(params.id)
    load_processor(params)
    if lora is not None:
        check_lora_targets(params, lora)


def load_base_model(
    params: ModelParams, precision: Precision
) -> tuple[PreTrainedModel, ProcessorMixin, LoadedModelInfo]:
    """Load model and processor through the Auto classes, in the dtype of `precision`, on the GPU if there is one."""
    dtype = DTYPES[precision]
    source = resolve(params.id, params.revision)
    target = device()
    model = _from_source(
        source,
        "weights",
        AutoModelForImageTextToText.from_pretrained,
        dtype=dtype,
        attn_implementation=params.attn_implementation,
        # one process: spread over the GPUs there are; one of several (DDP): a whole copy on its own GPU
        device_map=None if target.type != "cuda" else "auto" if world_size() == 1 else {"": target.index},
    )
    processor = _load_processor(source)
    resolved = recorded_revision(source, getattr(model.config, "_commit_hash", None))
    if params.id == RANDOM_MEDGEMMA_ID:
        logger.warning(
            "%s has random weights: its figures are for timing and memory only, never results", RANDOM_MEDGEMMA_ID
        )
    info = LoadedModelInfo(
        model_id=params.id,
        requested_revision=params.revision,
        resolved_revision=resolved,
        device=str(model.device),
        dtype=str(dtype).removeprefix("torch."),
    )
    logger.info("loaded %s (revision %s) on %s as %s", info.model_id, info.resolved_revision, info.device, info.dtype)
    return model, processor, info


def check_lora_targets(params: ModelParams, lora: LoraParams) -> None:
    """Refuse a `lora.target_modules` that matches no module of the model, from its config alone: in seconds and
    naming the key, rather than once the weights have loaded (minutes, for MedGemma)."""
    skeleton = model_on_meta(model_config(params))
    try:
        get_peft_model(skeleton, LoraConfig(target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    except ValueError as err:
        raise ParamsError(
            f"params: lora.target_modules={lora.target_modules!r} matches no module of {params.id} "
            f"({err}); expected all-linear, or a regular expression over its module names"
        ) from err
