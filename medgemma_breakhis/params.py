"""The one typed schema of `params.yaml`, loaded and validated in one place.

Every stage calls `load_params()` first, so an unknown key, a wrong type or a value out of range stops the stage
before any heavy work, with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import re
import reprlib
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.events import AliasEvent

from medgemma_breakhis.dotted import flatten, get, set_in
from medgemma_breakhis.errors import ExpectedError
from medgemma_breakhis.labels import FOLDS, MAGNIFICATIONS

DataSource = Literal["kaggle", "local", "synthetic"]
Precision = Literal["bf16", "fp16", "fp32"]
Balance = Literal["binary", "none"]
LrScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"]
AttnImplementation = Literal["sdpa", "eager"]
Auto = Literal["auto"]


# An error message quotes at most this much of a value; reprlib stops at similar bounds while building it.
SHOWN_CHARS = 100
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 3, 4, 6, 6
_SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 80, 40, 80
# Seeds go to numpy, pandas and torch, which take an unsigned 32-bit seed; counts to C integers.
SEED_LIMIT = 2**32
COUNT_LIMIT = 2**31 - 1


class ParamsError(ExpectedError, ValueError):
    """A value in params.yaml that the pipeline cannot run with."""


class ParamsChangedError(ExpectedError):
    """params.yaml changed while a stage ran: its results would be recorded under params they were not made with."""


def _shown(value: Any) -> str:
    """`value` as written in params.yaml, at most `SHOWN_CHARS` characters of it: a value may be huge."""
    text = _SHORT.repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


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
                raise ParamsError(f"params: {self.SECTION}.{f.name}={_shown(value)} is not allowed; expected {allowed}")


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
    seed: int = _key(0, f"an integer from 0 to {SEED_LIMIT - 1}", lambda v: 0 <= v < SEED_LIMIT)


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
                f"params: data.path={_shown(self.path)} is not allowed; expected the folder that holds "
                "Folds.csv when data.source=local"
            )


@dataclass(frozen=True)
class SplitParams(_Section):
    SECTION = "split"
    fold: int = _key(1, f"one of {_listed(FOLDS)} (the BreakHis folds)", lambda v: v in FOLDS)
    magnification: int = _key(100, f"one of {_listed(MAGNIFICATIONS)}", lambda v: v in MAGNIFICATIONS)
    seed: int = _key(42, f"an integer from 0 to {SEED_LIMIT - 1}", lambda v: 0 <= v < SEED_LIMIT)
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
    alpha: int = _key(16, f"an integer from 1 to {COUNT_LIMIT}", lambda v: 1 <= v <= COUNT_LIMIT)
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
    seed: int = _key(42, f"an integer from 0 to {SEED_LIMIT - 1}", lambda v: 0 <= v < SEED_LIMIT)
    logging_steps: int = _key(1, f"an integer from 1 to {COUNT_LIMIT}", lambda v: 1 <= v <= COUNT_LIMIT)
    # Optimizer steps between checkpoints that an interrupted `train` resumes from. Not part of what is trained: a
    # checkpoint stays valid when only this changes.
    checkpoint_steps: int = _key(25, f"an integer from 1 to {COUNT_LIMIT}", lambda v: 1 <= v <= COUNT_LIMIT)

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
    seed: int = _key(0, f"an integer from 0 to {SEED_LIMIT - 1}", lambda v: 0 <= v < SEED_LIMIT)


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


# A name that goes into `models:/<name>@<alias>` URIs and shell commands as it is.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class RegistryParams(_Section):
    """Where `evaluate` registers each evaluated adapter as a version of one MLflow model (docs/model-registry.md)."""

    SECTION = "registry"
    model_name: str = _key(
        "medgemma-breakhis",
        "a name of letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 characters",
        lambda v: _MODEL_NAME.fullmatch(v) is not None,
    )


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    split: SplitParams = field(default_factory=SplitParams)
    model: ModelParams = field(default_factory=ModelParams)
    lora: LoraParams = field(default_factory=LoraParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
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
        raise ParamsError(
            f"params: {prefix.rstrip('.') or 'the top level'} must be a mapping of keys, got {_shown(raw)}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - known))
    if unknown:
        keys = _shown(", ".join(f"{prefix}{k}" for k in unknown)).strip("'")
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


def _yaml_value(text: str, source: str) -> Any:
    """YAML 1.2 (as DVC writes it, so `1e-4` is a number), aliases refused before anything is built: a few hundred
    bytes of nested aliases expand to gigabytes, which every later step (validation, its message, MLflow) would walk.
    """
    yaml = YAML(typ="safe")
    try:
        for event in yaml.parse(text):
            if isinstance(event, AliasEvent):
                raise ParamsError(
                    f"{source}: YAML aliases (*{event.anchor}) are not allowed in params, at line "
                    f"{event.start_mark.line + 1}; write the value out"
                )
        return yaml.load(text)
    except YAMLError as err:
        raise ParamsError(f"{source} is not valid YAML: {_shown(str(err))}") from None


def parse_params(text: str, overrides: Sequence[str] = (), source: str = "params.yaml") -> Params:
    """Validate the text of a params file, with `section.key=value` overrides (as for `dvc exp run -S`) applied
    first. `source` names the file in messages."""
    raw = _yaml_value(text, f"params file {source}")
    if raw is None:  # a file emptied by accident must not silently mean "all defaults"
        raise ParamsError(
            f"params file {source} is empty; restore it (`git checkout {source}`), or write `{{}}` in it to "
            "run with every default"
        )
    for override in overrides:
        dotted, separator, value = override.partition("=")
        if not separator or "." not in dotted:
            raise ParamsError(f"override {_shown(override)} is not of the form section.key=value")
        if not isinstance(raw, dict):
            break  # refused below, as a file that is not a mapping
        set_in(raw, dotted, _yaml_value(value, f"override {_shown(override)}"))
    return params_from_dict(raw)


def load_params(path: Path = Path("params.yaml"), overrides: Sequence[str] = ()) -> Params:
    """Load and validate params.yaml; `overrides` as for `parse_params`."""
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the repository root, where params.yaml lives")
    return parse_params(path.read_text(encoding="utf-8"), overrides, str(path))


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


def file_digest(path: Path = Path("params.yaml")) -> str:
    """The sha256 of the params file's bytes (or `absent`): what a stage compares to see whether it changed."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


_SET_PARAM = re.compile(r"(?:(?P<file>[^=:]+):)?(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)", re.DOTALL)


def dvc_set_params(command: Sequence[str]) -> dict[str, Any]:
    """The values a `dvc exp run -S key=value` command line writes into params.yaml, by dotted key.

    Sweeps (`a,b`, `choice(…)`, `range(…)`), other files' keys and Hydra's `+key`/`~key` forms are left out: what
    they set is not known from the command alone."""
    if ("exp", "run") not in itertools.pairwise(command):
        return {}
    values: dict[str, Any] = {}
    arguments = iter(command)
    for argument in arguments:
        if argument in ("-S", "--set-param"):
            given = next(arguments, "")
        elif argument.startswith("--set-param="):
            given = argument.removeprefix("--set-param=")
        else:
            continue
        match = _SET_PARAM.fullmatch(given)
        if match is None or match["file"] not in (None, "params.yaml"):
            continue
        value = match["value"]
        if value.startswith(("choice(", "range(", "glob(")) or ("," in value and not value.startswith(("[", "{"))):
            continue
        try:
            values[match["key"]] = YAML(typ="safe").load(value)
        except YAMLError:
            continue
    return values


def changed_since(digest: str, asked: dict[str, Any], path: Path = Path("params.yaml")) -> str | None:
    """Why `path` is not what a stage started from, if it is not: its bytes differ from `digest`, or it lacks a value
    that the `dvc exp run` running the stage was asked to write (`asked`, from `dvc_set_params`)."""
    if file_digest(path) != digest:
        return f"{path} changed while this stage ran"
    if not asked:
        return None
    raw = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    for key, value in asked.items():
        if (now := get(raw, key)) != value:
            return f"{path} has {key}={_shown(now)}, but dvc exp run was asked for {key}={_shown(value)}"
    return None
