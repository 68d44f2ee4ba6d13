"""The one typed schema of `params.yaml`, loaded and validated in one place.

Every stage calls `load_params()` first, so an unknown key, a wrong type or a value out of range stops the stage
before any heavy work, with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML

DataSource = Literal["kaggle", "local", "synthetic"]
Precision = Literal["bf16", "fp16", "fp32"]
Balance = Literal["binary", "none"]
LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"]
AttnImplementation = Literal["sdpa", "eager"]


class ParamsError(ValueError):
    """A value in params.yaml that the pipeline cannot run with."""


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ParamsError(f"params: {key}={value!r} is not allowed; expected {allowed}")


@dataclass(frozen=True)
class SyntheticData:
    """Shape of the generated offline dataset (used only when data.source=synthetic)."""

    patients_per_class: int = 5
    images_per_patient: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        # Five patients per class give every one of the five folds its own test patient in every class.
        _require(5 <= self.patients_per_class <= 50, "data.synthetic.patients_per_class", self.patients_per_class,
                 "an integer from 5 to 50")
        _require(1 <= self.images_per_patient <= 100, "data.synthetic.images_per_patient", self.images_per_patient,
                 "an integer from 1 to 100")
        _require(self.seed >= 0, "data.synthetic.seed", self.seed, "an integer >= 0")


@dataclass(frozen=True)
class DataParams:
    source: DataSource = "kaggle"
    kaggle_dataset: str = "ambarish/breakhis"
    path: str | None = None
    synthetic: SyntheticData = field(default_factory=SyntheticData)

    def __post_init__(self) -> None:
        _require(self.source != "local" or bool(self.path), "data.path", self.path,
                 "the folder that holds Folds.csv when data.source=local")
        _require(self.kaggle_dataset.count("/") == 1, "data.kaggle_dataset", self.kaggle_dataset,
                 "a Kaggle handle of the form owner/dataset")


@dataclass(frozen=True)
class SplitParams:
    fold: int = 1
    magnification: int = 100
    seed: int = 42
    balance: Balance = "binary"

    def __post_init__(self) -> None:
        _require(1 <= self.fold <= 5, "split.fold", self.fold, "one of 1, 2, 3, 4, 5 (the BreakHis folds)")
        _require(self.magnification in (40, 100, 200, 400), "split.magnification", self.magnification,
                 "one of 40, 100, 200, 400")
        _require(self.seed >= 0, "split.seed", self.seed, "an integer >= 0")


@dataclass(frozen=True)
class ModelParams:
    id: str = "google/medgemma-4b-it"
    revision: str = "main"
    attn_implementation: AttnImplementation = "sdpa"

    def __post_init__(self) -> None:
        _require(bool(self.id.strip()), "model.id", self.id, "a hub id, a local path or tiny-gemma3")
        _require(bool(self.revision.strip()), "model.revision", self.revision, "a branch, tag or commit")


@dataclass(frozen=True)
class LoraParams:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: str = "all-linear"

    def __post_init__(self) -> None:
        _require(1 <= self.r <= 1024, "lora.r", self.r, "an integer from 1 to 1024")
        _require(self.alpha >= 1, "lora.alpha", self.alpha, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a number in [0, 1)")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 5
    learning_rate: float = 5.0e-4
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    batch_size: int = 1
    grad_accum_steps: int = 8
    gradient_checkpointing: bool = True
    optim: Optimizer = "adamw_torch"
    precision: Precision = "bf16"
    seed: int = 42
    logging_steps: int = 1

    def __post_init__(self) -> None:
        _require(1 <= self.epochs <= 1000, "train.epochs", self.epochs, "an integer from 1 to 1000")
        _require(0.0 < self.learning_rate <= 1.0, "train.learning_rate", self.learning_rate, "a number in (0, 1]")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        _require(self.max_grad_norm > 0.0, "train.max_grad_norm", self.max_grad_norm, "a number > 0")
        _require(1 <= self.batch_size <= 1024, "train.batch_size", self.batch_size, "an integer from 1 to 1024")
        _require(1 <= self.grad_accum_steps <= 1024, "train.grad_accum_steps", self.grad_accum_steps,
                 "an integer from 1 to 1024")
        _require(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        _require(self.logging_steps >= 1, "train.logging_steps", self.logging_steps, "an integer >= 1")


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 8
    precision: Precision = "bf16"
    # score: one forward pass, the answer with the highest logit among "0".."7". generate: the reference's greedy
    # generation and answer parsing, for comparison with the blog.
    method: Literal["score", "generate"] = "score"
    max_new_tokens: int = 40
    bootstrap_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        _require(1 <= self.batch_size <= 1024, "eval.batch_size", self.batch_size, "an integer from 1 to 1024")
        _require(1 <= self.max_new_tokens <= 512, "eval.max_new_tokens", self.max_new_tokens,
                 "an integer from 1 to 512")
        _require(100 <= self.bootstrap_resamples <= 100_000, "eval.bootstrap_resamples", self.bootstrap_resamples,
                 "an integer from 100 to 100000")
        _require(self.seed >= 0, "eval.seed", self.seed, "a non-negative integer")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {prefix.rstrip('.') or 'the top level'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        allowed = ", ".join(prefix + k for k in sorted(known))
        raise ParamsError(f"params: unknown key {keys}; allowed keys here: {allowed}")
    kwargs = {}
    for name, value in raw.items():
        key, tp = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{key}.")
        elif not _matches(value, tp):
            raise ParamsError(f"params: {key}={value!r} is not allowed; expected {_describe(tp)}")
        else:
            kwargs[name] = float(value) if tp is float else value
    return cls(**kwargs)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a nested mapping (as in params.yaml) into `Params`; missing keys take the schema defaults."""
    return _build(Params, raw, "")


def load_params(path: Path = Path("params.yaml"), overrides: Sequence[str] = ()) -> Params:
    """Load and validate params.yaml (YAML 1.2, as DVC writes it, so `1e-4` is a number).

    `overrides` are `section.key=value` strings, as for `dvc exp run -S`, applied before validation.
    """
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the repository root, where params.yaml lives")
    yaml = YAML(typ="safe")
    raw = yaml.load(path.read_text(encoding="utf-8")) or {}
    for override in overrides:
        dotted, separator, value = override.partition("=")
        if not separator or "." not in dotted:
            raise ParamsError(f"override {override!r} is not of the form section.key=value")
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = yaml.load(value)
    return params_from_dict(raw)


def to_flat_dict(params: Params) -> dict[str, Any]:
    """`{"lora.r": 8, ...}`: the form MLflow and DVC show params in."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                flat[f"{prefix}{f.name}"] = value

    walk(params, "")
    return flat
