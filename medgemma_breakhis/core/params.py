"""The schema of params.yaml (no defaults), loaded with `-S section.key=value` overrides; errors in one line."""

import argparse
import reprlib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.events import AliasEvent

from medgemma_breakhis.core.errors import ParamsError

TINY_MODEL_ID = "tiny-gemma3"  # built locally (model/builtin.py): the offline default
RANDOM_MEDGEMMA_ID = "medgemma-4b-random"  # built locally: MedGemma 4B's shapes, for timing
OFFLINE = f"-S data.source=synthetic -S model.id={TINY_MODEL_ID}"  # make demo's profile: no Kaggle, no hub
Fold = Literal[1, 2, 3, 4, 5]
Magnification = Literal[40, 100, 200, 400]
Precision = Literal["bf16", "fp16", "fp32"]
Auto = Literal["auto"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
SEED_LIMIT = 2**32 - 1  # numpy, pandas and torch take an unsigned 32-bit seed
COUNT_LIMIT = 2**31 - 1  # counts go to C integers
SHOWN_CHARS = 100  # the most of a value an error message quotes; reprlib stops near it while building it
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 3, 4, 6, 6
_SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 80, 40, 80


def between(low: int, high: int) -> Any:
    return Field(ge=low, le=high, description=f"an integer from {low} to {high}")


def distinct_list(of: str, minimum: int) -> Any:
    """A list field of at least `minimum` distinct values (YAML's list, kept as a tuple)."""
    return Field(strict=False, min_length=minimum, description=f"a list of {of}")


def _distinct(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError("values repeat")
    return values


Magnifications = Annotated[tuple[Magnification, ...], AfterValidator(_distinct)]
Folds = Annotated[tuple[Fold, ...], AfterValidator(_distinct)]


class Section(BaseModel):
    """A params section: exactly its keys, each of its type (YAML's `1` is a number; nothing else is converted)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class SyntheticData(Section):
    patients_per_class: int = between(5, 50)  # five: every fold has a test patient of every class
    images_per_patient: int = between(1, 100)
    magnifications: Magnifications = distinct_list("distinct magnifications from 40, 100, 200, 400", 1)
    seed: int = between(0, SEED_LIMIT)


class DataParams(Section):
    source: Literal["kaggle", "local", "synthetic"]
    kaggle_dataset: str = Field(pattern=r"^[^/]+/[^/]+$", description="a Kaggle handle of the form owner/dataset")
    path: str | None = Field(description="a string (a folder) or null")
    exclude_invalid: bool
    synthetic: SyntheticData

    @model_validator(mode="after")
    def _local_needs_a_path(self) -> "DataParams":
        if self.source == "local" and not self.path:
            raise ValueError(
                f"params: data.path={_shown(self.path)} is not allowed; expected the folder that holds Folds.csv when "
                "data.source=local"
            )
        return self


class SplitParams(Section):
    fold: int = Field(ge=1, le=5, description="one of 1, 2, 3, 4, 5 (the BreakHis folds)")
    magnification: Magnification
    seed: int = between(0, SEED_LIMIT)
    balance: Literal["binary", "none"]


class ModelParams(Section):
    id: str = Field(pattern=r"\S", description="a hub id, a local path, tiny-gemma3 or medgemma-4b-random")
    revision: str = Field(pattern=r"\S", description="a branch, tag or commit")
    attn_implementation: Literal["sdpa", "eager"]

    @property
    def kind(self) -> Literal["built-in", "folder", "hub"]:
        """A model built locally, a folder (`./x`, `/x`, `~/x`, `a/b/c`, or one that exists), or a hub id."""
        if self.id in (TINY_MODEL_ID, RANDOM_MEDGEMMA_ID):
            return "built-in"
        if self.id.startswith((".", "/", "~")) or self.id.count("/") > 1 or "\\" in self.id or Path(self.id).is_dir():
            return "folder"
        return "hub"


class LoraParams(Section):
    r: int = between(1, 1024)
    alpha: int = between(1, COUNT_LIMIT)
    dropout: float = Field(ge=0, lt=1, description="a number in [0, 1)")
    target_modules: str = Field(pattern=r"\S", description="a peft target_modules string, e.g. all-linear")


class TrainParams(Section):
    """What is trained; every key but `batch_size` and `precision` goes to trl's SFTConfig (docs/design.md)."""

    epochs: int = Field(ge=1, le=1000, serialization_alias="num_train_epochs", description="an integer from 1 to 1000")
    learning_rate: float = Field(gt=0, le=1, description="a number in (0, 1]")
    lr_scheduler: Scheduler = Field(serialization_alias="lr_scheduler_type")
    # transformers 5 reads warmup_steps below 1 as a fraction of all steps
    warmup_ratio: float = Field(ge=0, lt=1, serialization_alias="warmup_steps", description="a number in [0, 1)")
    max_grad_norm: float = Field(gt=0, description="a number > 0")
    batch_size: int = between(1, 1024)  # examples per optimizer step, all processes together
    optim: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit"]
    precision: Precision
    seed: int = between(0, SEED_LIMIT)
    logging_steps: int = between(1, COUNT_LIMIT)


class ExecutionParams(Section):
    """How a training step is executed: none of it changes what is trained, so no stage depends on it."""

    micro_batch_size: Auto | Annotated[int, between(1, 1024)] = Field(description="auto or an integer from 1 to 1024")
    gradient_checkpointing: Auto | bool = Field(description="auto, true or false")
    dataloader_workers: Auto | Annotated[int, between(0, 64)] = Field(description="auto or an integer from 0 to 64")
    compile: Auto | bool = Field(description="auto, true or false")
    num_processes: int = between(1, 64)
    checkpoint_steps: int = between(1, COUNT_LIMIT)


class EvalParams(Section):
    batch_size: int = between(1, 1024)
    precision: Precision
    method: Literal["score", "generate"]
    max_new_tokens: int = between(1, 512)
    bootstrap_resamples: int = between(100, 100_000)
    seed: int = between(0, SEED_LIMIT)


class RegistryParams(Section):
    model_name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="a name of letters, digits, '.', '_' and '-', starting with a letter or digit, at most 100 "
        "characters",
    )


class CrossValidationParams(Section):
    folds: Folds = distinct_list("at least two distinct folds from 1 to 5", 2)
    magnifications: Magnifications = distinct_list("distinct magnifications from 40, 100, 200, 400", 1)


class Params(Section):
    data: DataParams
    split: SplitParams
    model: ModelParams
    lora: LoraParams
    train: TrainParams
    execution: ExecutionParams
    eval: EvalParams
    registry: RegistryParams
    cv: CrossValidationParams

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        train, execution = self.train, self.execution
        if train.batch_size % execution.num_processes:
            raise ValueError(
                f"params: train.batch_size={train.batch_size} is not allowed with execution.num_processes="
                f"{execution.num_processes}; expected a multiple of execution.num_processes"
            )
        per_process = train.batch_size // execution.num_processes
        if execution.micro_batch_size != "auto" and per_process % execution.micro_batch_size:
            raise ValueError(
                f"params: execution.micro_batch_size={execution.micro_batch_size} is not allowed with "
                f"train.batch_size={train.batch_size} on {execution.num_processes} process(es); expected auto or a "
                f"divisor of {per_process}, the examples per step and process"
            )
        drawn = self.data.synthetic.magnifications
        if self.data.source == "synthetic":  # so that `download` never draws a set split_balance cannot select from
            for key, selected in (("split.magnification", self.split.magnification), ("cv.magnifications", None)):
                chosen = (selected,) if selected else self.cv.magnifications
                if any(m not in drawn for m in chosen):
                    wanted = ",".join(str(m) for m in typing.get_args(Magnification) if m in drawn or m in chosen)
                    raise ValueError(
                        f"params: {key}={selected or list(chosen)!r} is not allowed with data.source=synthetic and "
                        f"data.synthetic.magnifications={list(drawn)}; expected magnifications the synthetic set "
                        f"draws, or draw them too: -S 'data.synthetic.magnifications=[{wanted}]'"
                    )
        return self

    def flat(self) -> dict[str, Any]:
        """`{"lora.r": 8, ...}`: the form MLflow and DVC show params in."""
        return flatten(self.model_dump(mode="json"))


def _shown(value: Any) -> str:
    """`value` as written in params.yaml, cut to `SHOWN_CHARS` characters: a value may be huge."""
    text = _SHORT.repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _message(error: ValidationError, raw: Any) -> str:
    """The first problem of `error`, in one line: the key, its value and what is allowed."""
    first = error.errors()[0]
    model, names, info = Params, [], None
    for part in first["loc"]:  # up to the first part that names no field: a union member, a list index
        if part not in (fields := getattr(model, "model_fields", {})):
            break
        names.append(part)
        info = fields[part]
        model = info.annotation
    key = ".".join(names)
    if first["type"] == "value_error" and str(first["ctx"]["error"]).startswith("params: "):
        return str(first["ctx"]["error"])
    if first["type"] == "extra_forbidden":
        unknown = [".".join(map(str, e["loc"])) for e in error.errors() if e["type"] == "extra_forbidden"]
        fields = info.annotation.model_fields if info else Params.model_fields
        allowed = ", ".join(f"{key}.{name}" if key else name for name in sorted(fields))
        return f"params: unknown key {_shown(', '.join(unknown)).strip(chr(39))}; allowed keys here: {allowed}"
    if first["type"] == "model_type":
        return f"params: {key or 'the top level'} must be a mapping of keys, got {_shown(first['input'])}"
    if first["type"] == "missing":
        return f"params: {key} is missing; params.yaml sets every key (`git show HEAD:params.yaml` lists them)"
    allowed = info.description or "one of " + ", ".join(map(str, typing.get_args(info.annotation)))
    return f"params: {key}={_shown(dotted_get(raw, key))} is not allowed; expected {allowed}"


def params_from_dict(raw: Any) -> Params:
    """Validate a nested mapping, as in params.yaml: every key must be there."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_message(err, raw)) from None


def _yaml_value(text: str, source: str) -> Any:
    """YAML 1.2, as DVC writes it; aliases are refused before anything is built (nested ones expand to gigabytes)."""
    yaml = YAML(typ="safe")
    try:
        for event in yaml.parse(text):
            if isinstance(event, AliasEvent):
                raise ParamsError(
                    f"{source}: YAML aliases (*{event.anchor}) are not allowed in params, at line "
                    f"{event.start_mark.line + 1}; write the value out"
                )
        return yaml.load(text)
    except (YAMLError, ValueError) as err:  # ValueError: an integer of more digits than Python converts
        raise ParamsError(f"{source} is not valid YAML: {_shown(str(err))}") from None


def parse_params(text: str, overrides: Sequence[str] = (), source: str = "params.yaml") -> Params:
    """Validate the text of a params file after applying `section.key=value` overrides (as `dvc exp run -S` does)."""
    raw = _yaml_value(text, f"params file {source}")
    if raw is None:  # a file emptied by accident must not pass for anything
        raise ParamsError(f"params file {source} is empty; restore it (`git checkout {source}`)")
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or "." not in key:
            raise ParamsError(f"override {_shown(override)} is not of the form section.key=value")
        if isinstance(raw, dict):
            set_in(raw, key, _yaml_value(value, f"override {_shown(override)}"))
    return params_from_dict(raw)


def load_params(path: Path = Path("params.yaml"), overrides: Sequence[str] = ()) -> Params:
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the repository root, where params.yaml lives")
    return parse_params(path.read_text(encoding="utf-8"), overrides, str(path))


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`-S section.key=value`, repeatable, as for `dvc exp run -S`."""
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param of params.yaml, as `dvc exp run -S` does",
    )


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Every leaf of `tree` under its dotted key (`lora.r`); a dict is a branch, anything else a leaf."""
    flat: dict[str, Any] = {}
    for name, child in tree.items():
        flat |= {f"{name}.{k}": v for k, v in flatten(child).items()} if isinstance(child, Mapping) else {name: child}
    return flat


def dotted_get(tree: Any, key: str) -> Any:
    for part in key.split(".") if key else []:
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def set_in(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for parent in parents:
        tree = tree.setdefault(parent, {})
    tree[leaf] = value
