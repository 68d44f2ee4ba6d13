"""The one typed schema of `params.yaml`, loaded and validated in one place.

Every stage calls `load_params()` first, so an unknown key, a wrong type or a value out of range stops the stage
before any heavy work, with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML

from medgemma_breakhis.dotted import flatten, set_in
from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.labels import FOLDS, MAGNIFICATIONS

DataSource = Literal["kaggle", "local", "synthetic"]
Precision = Literal["bf16", "fp16", "fp32"]
Balance = Literal["binary", "none"]
LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"]
AttnImplementation = Literal["sdpa", "eager"]
Auto = Literal["auto"]


class ParamsError(ExpectedError, ValueError):
    """A value in params.yaml that the pipeline cannot run with."""


def _key(default: Any, allowed: str, check: Callable[[Any], bool] | None = None) -> Any:
    """A param with its default, the description of what is allowed (used in every error message for the key, type
    errors included) and, beyond its type, the rule it must meet."""
    return field(default=default, metadata={"allowed": allowed, "check": check})


class _Section:
    """Checks every field of a params section, when built from params.yaml or in code, against its type and rule."""

    SECTION = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, tp = getattr(self, f.name), hints[f.name]
            if dataclasses.is_dataclass(tp):
                continue
            check = f.metadata.get("check")
            if not _matches(value, tp) or (check is not None and not check(value)):
                allowed = f.metadata.get("allowed") or _describe(tp)
                shown = list(value) if isinstance(value, tuple) else value  # as written in params.yaml
                raise ParamsError(f"params: {self.SECTION}.{f.name}={shown!r} is not allowed; expected {allowed}")


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values))


def _distinct(values: tuple[int, ...]) -> bool:
    return len(set(values)) == len(values)


@dataclass(frozen=True)
class SyntheticData(_Section):
    """Shape of the generated offline dataset (used only when data.source=synthetic)."""

    SECTION = "data.synthetic"
    # Five patients per class give every one of the five folds its own test patient in every class.
    patients_per_class: int = _key(5, "an integer from 5 to 50", lambda v: 5 <= v <= 50)
    images_per_patient: int = _key(4, "an integer from 1 to 100", lambda v: 1 <= v <= 100)
    # All four, as in BreakHis; fewer draw only what the split can select (make demo: [100]).
    magnifications: tuple[int, ...] = _key(
        MAGNIFICATIONS,
        f"a list of distinct magnifications from {_listed(MAGNIFICATIONS)}",
        lambda v: len(v) >= 1 and _distinct(v) and all(m in MAGNIFICATIONS for m in v),
    )
    seed: int = _key(0, "an integer >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class DataParams(_Section):
    SECTION = "data"
    source: DataSource = "kaggle"
    kaggle_dataset: str = _key(
        "ambarish/breakhis", "a Kaggle handle of the form owner/dataset", lambda v: v.count("/") == 1
    )
    path: str | None = _key(None, "a string (a folder) or null")
    # false: any listed image that is missing, does not decode, or is not a 700x460 RGB image under the right
    # benign/malignant folder stops `download` with the full list. true: such images are left out, and listed with
    # the reason in the excluded-images report.
    exclude_invalid: bool = False
    synthetic: SyntheticData = field(default_factory=SyntheticData)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "local" and not self.path:
            raise ParamsError(
                f"params: data.path={self.path!r} is not allowed; expected the folder that holds "
                "Folds.csv when data.source=local"
            )


@dataclass(frozen=True)
class SplitParams(_Section):
    SECTION = "split"
    fold: int = _key(1, f"one of {_listed(FOLDS)} (the BreakHis folds)", lambda v: v in FOLDS)
    magnification: int = _key(100, f"one of {_listed(MAGNIFICATIONS)}", lambda v: v in MAGNIFICATIONS)
    seed: int = _key(42, "an integer >= 0", lambda v: v >= 0)
    balance: Balance = "binary"


@dataclass(frozen=True)
class ModelParams(_Section):
    SECTION = "model"
    id: str = _key(
        "google/medgemma-4b-it", "a hub id, a local path, tiny-gemma3 or medgemma-4b-random", lambda v: bool(v.strip())
    )
    revision: str = _key("main", "a branch, tag or commit", lambda v: bool(v.strip()))
    attn_implementation: AttnImplementation = "sdpa"


@dataclass(frozen=True)
class LoraParams(_Section):
    SECTION = "lora"
    r: int = _key(8, "an integer from 1 to 1024", lambda v: 1 <= v <= 1024)
    alpha: int = _key(16, "an integer >= 1", lambda v: v >= 1)
    dropout: float = _key(0.1, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
    target_modules: str = _key("all-linear", "a peft target_modules string, e.g. all-linear", lambda v: bool(v.strip()))


@dataclass(frozen=True)
class TrainParams(_Section):
    SECTION = "train"
    epochs: int = _key(5, "an integer from 1 to 1000", lambda v: 1 <= v <= 1000)
    learning_rate: float = _key(5.0e-4, "a number in (0, 1]", lambda v: 0.0 < v <= 1.0)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = _key(0.03, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
    max_grad_norm: float = _key(0.3, "a number > 0", lambda v: v > 0.0)
    # The optimisation: examples per optimizer step, all processes together. How each step is executed (the keys
    # below down to compile) never changes what is trained: those keys re-run nothing in DVC and a
    # checkpoint stays valid across them (`checkpoints.NOT_FINGERPRINTED`).
    batch_size: int = _key(8, "an integer from 1 to 1024", lambda v: 1 <= v <= 1024)
    # Examples per forward/backward pass and process; the rest of the batch is gradient accumulation. auto: the
    # fastest setting whose estimated memory fits this GPU (`execution.plan_execution`).
    micro_batch_size: int | Auto = _key(
        "auto", "auto or an integer from 1 to 1024", lambda v: v == "auto" or 1 <= v <= 1024
    )
    gradient_checkpointing: bool | Auto = _key("auto", "auto, true or false")
    dataloader_workers: int | Auto = _key(
        "auto", "auto or an integer from 0 to 64", lambda v: v == "auto" or 0 <= v <= 64
    )
    # torch.compile per layer; auto: on a GPU, without gradient checkpointing (the combination measured).
    compile: bool | Auto = _key("auto", "auto, true or false")
    # > 1: data-parallel (DDP) training on that many processes under `accelerate launch`, one per GPU. Each process
    # sees its own shard of the data, so this does change what is trained.
    num_processes: int = _key(1, "an integer from 1 to 64", lambda v: 1 <= v <= 64)
    # one fused kernel for all LoRA tensors instead of a few per tensor: 10% faster steps on an H100
    optim: Optimizer = "adamw_torch_fused"
    precision: Precision = "bf16"
    seed: int = _key(42, "an integer >= 0", lambda v: v >= 0)
    logging_steps: int = _key(1, "an integer >= 1", lambda v: v >= 1)
    # Optimizer steps between checkpoints that an interrupted `train` resumes from. Not part of what is trained: a
    # checkpoint stays valid when only this changes.
    checkpoint_steps: int = _key(25, "an integer >= 1", lambda v: v >= 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size % self.num_processes:
            raise ParamsError(
                f"params: train.batch_size={self.batch_size} is not allowed with train.num_processes="
                f"{self.num_processes}; expected a multiple of train.num_processes"
            )
        per_process = self.batch_size // self.num_processes
        if self.micro_batch_size != "auto" and per_process % self.micro_batch_size:
            raise ParamsError(
                f"params: train.micro_batch_size={self.micro_batch_size} is not allowed with "
                f"train.batch_size={self.batch_size} on {self.num_processes} process(es); expected auto "
                f"or a divisor of {per_process}, the examples per step and process"
            )


@dataclass(frozen=True)
class EvalParams(_Section):
    SECTION = "eval"
    batch_size: int = _key(8, "an integer from 1 to 1024", lambda v: 1 <= v <= 1024)
    precision: Precision = "bf16"
    # score: one forward pass, the answer with the highest logit among "0".."7". generate: the reference's greedy
    # generation and answer parsing, for comparison with the blog.
    method: Literal["score", "generate"] = "score"
    max_new_tokens: int = _key(40, "an integer from 1 to 512", lambda v: 1 <= v <= 512)
    bootstrap_resamples: int = _key(2000, "an integer from 100 to 100000", lambda v: 100 <= v <= 100_000)
    seed: int = _key(0, "an integer >= 0", lambda v: v >= 0)


@dataclass(frozen=True)
class CrossValidationParams(_Section):
    """What cv/dvc.yaml runs: every fold at every magnification listed (the single-fold pipeline ignores these)."""

    SECTION = "cv"
    folds: tuple[int, ...] = _key(
        FOLDS,
        f"a list of at least two distinct folds from {FOLDS[0]} to {FOLDS[-1]}",
        lambda v: len(v) >= 2 and _distinct(v) and all(f in FOLDS for f in v),
    )
    magnifications: tuple[int, ...] = _key(
        (100,),
        f"a list of distinct magnifications from {_listed(MAGNIFICATIONS)}",
        lambda v: len(v) >= 1 and _distinct(v) and all(m in MAGNIFICATIONS for m in v),
    )


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    cv: CrossValidationParams = field(default_factory=CrossValidationParams)

    def __post_init__(self) -> None:
        if self.data.source != "synthetic":
            return
        # Checked in every stage, so that `download` fails before drawing a set split_balance could not select from.
        drawn = self.data.synthetic.magnifications
        for key, selected in (
            ("split.magnification", (self.split.magnification,)),
            ("cv.magnifications", self.cv.magnifications),
        ):
            if any(m not in drawn for m in selected):
                shown = selected[0] if key == "split.magnification" else list(selected)
                wanted = ",".join(str(m) for m in MAGNIFICATIONS if m in drawn or m in selected)
                raise ParamsError(
                    f"params: {key}={shown!r} is not allowed with data.source=synthetic and "
                    f"data.synthetic.magnifications={list(drawn)}; expected magnifications the synthetic set draws, "
                    f"or draw them too: -S 'data.synthetic.magnifications=[{wanted}]'"
                )


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of values, each {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
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
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)  # YAML's lists, kept immutable like the rest of the params
        else:  # the section checks type and rule; YAML's `1` where a number belongs is that number
            kwargs[name] = float(value) if tp is float and _matches(value, float) else value
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
    raw = yaml.load(path.read_text(encoding="utf-8"))
    if raw is None:  # a file emptied by accident must not silently mean "all defaults"
        raise ParamsError(
            f"params file {path} is empty; restore it (`git checkout {path}`), or write `{{}}` in it to "
            "run with every default"
        )
    for override in overrides:
        dotted, separator, value = override.partition("=")
        if not separator or "." not in dotted:
            raise ParamsError(f"override {override!r} is not of the form section.key=value")
        set_in(raw, dotted, yaml.load(value))
    return params_from_dict(raw)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`-S section.key=value`, repeatable, as for `dvc exp run -S`: applied to params.yaml before validation."""
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param of params.yaml, as `dvc exp run -S` does",
    )


def to_flat_dict(params: Params) -> dict[str, Any]:
    """`{"lora.r": 8, ...}`: the form MLflow and DVC show params in."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in flatten(dataclasses.asdict(params)).items()
    }
