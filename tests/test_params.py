import time
from pathlib import Path

import pytest
from repo_params import PARAMS_YAML as REPO_PARAMS
from repo_params import params, raw_params

from medgemma_breakhis.core.errors import ParamsError
from medgemma_breakhis.core.params import Params, Section, load_params, params_from_dict


def test_repository_defaults_are_the_reference_experiment() -> None:
    flat = load_params(REPO_PARAMS).flat()
    assert (
        flat
        | {
            "data.source": "kaggle",
            "data.kaggle_dataset": "ambarish/breakhis",
            "split.fold": 1,
            "split.magnification": 100,
            "split.seed": 42,
            "split.balance": "binary",
            "model.id": "google/medgemma-4b-it",
            "lora.r": 8,
            "lora.alpha": 16,
            "lora.dropout": 0.1,
            "lora.target_modules": "all-linear",
            "train.epochs": 5,
            "train.learning_rate": 5e-4,
            "train.lr_scheduler": "cosine",
            "train.warmup_ratio": 0.03,
            "train.max_grad_norm": 0.3,
            "train.batch_size": 8,
            "train.precision": "bf16",
        }
        == flat
    )


def test_repository_params_file_sets_every_key() -> None:
    """params.yaml is the one place users look: no schema default may be hidden from it."""
    from ruamel.yaml import YAML

    raw = YAML(typ="safe").load(REPO_PARAMS.read_text())
    written = set()

    def walk(node, prefix=""):
        for key, value in node.items():
            walk(value, f"{prefix}{key}.") if isinstance(value, dict) else written.add(f"{prefix}{key}")

    walk(raw)
    assert written == set(load_params(REPO_PARAMS).flat())


def test_params_yaml_is_the_one_source_of_values() -> None:
    """The schema has no defaults, so no value can be written twice and drift: a key params.yaml lacks is refused."""
    with pytest.raises(ParamsError, match=r"^params: train.epochs is missing; params.yaml sets every key"):
        params_from_dict(_without("train.epochs"))
    with pytest.raises(ParamsError, match=r"^params: the top level must be a mapping"):
        params_from_dict([1, 2])


def _without(key: str) -> dict:
    raw = raw_params()
    section, name = key.split(".")
    del raw[section][name]
    return raw


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lora": {"r": 0}}, r"lora.r=0 is not allowed; expected an integer from 1 to 1024"),
        ({"train": {"precision": "fp8"}}, r"train.precision='fp8' is not allowed; expected one of bf16, fp16, fp32"),
        ({"split": {"fold": 9}}, r"split.fold=9 is not allowed; expected one of 1, 2, 3, 4, 5"),
        (
            {"execution": {"micro_batch_size": 3}},
            r"execution.micro_batch_size=3 is not allowed with train.batch_size=8 on 1 process\(es\); expected auto or a "
            + "divisor",
        ),
        (
            {"train": {"batch_size": 6}, "execution": {"num_processes": 4}},
            r"train.batch_size=6 .* expected a multiple of execution.num_proc",
        ),
        ({"execution": {"compile": "yes"}}, r"execution.compile='yes' is not allowed; expected auto, true or false"),
        ({"split": {"magnification": 50}}, r"split.magnification=50 .* one of 40, 100, 200, 400"),
        ({"data": {"source": "s3"}}, r"data.source='s3' .* one of kaggle, local, synthetic"),
        ({"data": {"source": "local", "path": None}}, r"data.path=None .* the folder that holds Folds.csv"),
        ({"lora": {"rank": 8}}, r"unknown key lora.rank; allowed keys here: lora.alpha, lora.dropout, lora.r"),
        ({"trian": {}}, r"unknown key trian"),
        ({"train": {"learning_rate": "fast"}}, r"train.learning_rate='fast' is not allowed; expected a number"),
        ({"train": {"epochs": 2.5}}, r"train.epochs=2.5 is not allowed; expected an integer"),
        ({"execution": {"gradient_checkpointing": "yes"}}, r"expected auto, true or false"),
        ({"lora": 8}, r"lora must be a mapping"),
        (
            {"data": {"synthetic": {"magnifications": [100, 100]}}},
            r"data.synthetic.magnifications=\[100, 100\] is not allowed; expected a list of distinct magnifications",
        ),
        (
            {"data": {"source": "synthetic", "synthetic": {"magnifications": [100]}}, "split": {"magnification": 200}},
            r"split.magnification=200 is not allowed with data.source=synthetic and "
            + r"data.synthetic.magnifications=\[100\]; .* -S 'data.synthetic.magnifications=\[100,200\]'",
        ),
        (
            {
                "data": {"source": "synthetic", "synthetic": {"magnifications": [100]}},
                "cv": {"magnifications": [400, 40]},
            },
            r"cv.magnifications=\[400, 40\] is not allowed with .* -S 'data.synthetic.magnifications=\[40,100,400\]'",
        ),
    ],
)
def test_invalid_params_name_key_value_and_what_is_allowed(raw: dict, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        params(raw)


def test_yaml_1_2_scientific_notation_is_a_number(tmp_path: Path) -> None:
    """DVC writes `-S train.learning_rate=1e-4` as 1e-4, which YAML 1.1 loaders read as a string."""
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.read_text().replace("learning_rate: 5.0e-4", "learning_rate: 1e-4"))
    assert load_params(path).train.learning_rate == pytest.approx(1e-4)


def test_synthetic_magnifications_bind_the_selection_only_for_synthetic_data() -> None:
    drawn = {"synthetic": {"magnifications": [100]}}
    assert params({"data": {"source": "synthetic", **drawn}}).data.synthetic.magnifications == (100,)
    assert params({"data": {"source": "kaggle", **drawn}, "split": {"magnification": 200}})


def test_integer_where_a_float_belongs_is_accepted() -> None:
    assert params({"train": {"max_grad_norm": 1}}).train.max_grad_norm == 1.0


def test_missing_params_file_says_where_to_run(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="repository root"):
        load_params(tmp_path / "params.yaml")


def _schema_fields() -> list[tuple[str, object, str | None]]:
    """(dotted key, value in params.yaml, the field's description) of every leaf key of the schema."""
    leaves = []

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
                walk(info.annotation, f"{prefix}{name}.")
            else:
                key = f"{prefix}{name}"
                leaves.append((key, load_params(REPO_PARAMS).flat()[key], info.description))

    walk(Params, "")
    return leaves


@pytest.mark.parametrize(
    ("key", "value", "description"), _schema_fields(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_key_rejects_a_wrong_type_naming_key_value_and_allowed_range(key: str, value, description) -> None:
    wrong = "not-a-number" if isinstance(value, (int, float)) else 12345  # bools are ints: "not-a-number" too
    section, _, name = key.rpartition(".")
    raw: dict = {}
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = wrong
    with pytest.raises(ParamsError) as caught:
        params(raw)
    message = str(caught.value)
    assert message.startswith(f"params: {key}={wrong!r} is not allowed; expected ")
    if description:  # the same description as for an out-of-range value of the right type
        assert message.endswith(description)


def test_yaml_aliases_are_refused_at_once_and_a_huge_value_is_quoted_in_at_most_a_line(tmp_path: Path) -> None:
    """3.4 KB of nested aliases expand to gigabytes: 852abeb's loader (and its message quoting the value) hung."""
    levels = [f"l0: &l0 [{', '.join(['x'] * 9)}]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 12)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(["lora:", *(f"  {line}" for line in levels), "  r: *l11"]) + "\n")
    started = time.monotonic()
    with pytest.raises(ParamsError, match=rf"^params file {path}: YAML aliases \(\*l0\) are not allowed in params"):
        load_params(path)
    assert time.monotonic() - started < 1
    with pytest.raises(ParamsError, match=r"YAML aliases \(\*a\) are not allowed"):
        load_params(REPO_PARAMS, ["lora.target_modules=[&a x, *a]"])
    with pytest.raises(ParamsError) as caught:
        params({"lora": {"target_modules": "q_proj" * 10_000}, "model": {"id": ["x" * 1000] * 1000}})
    quoted = str(caught.value).removeprefix("params: model.id=").partition(" is not allowed")[0]
    assert 0 < len(quoted) <= 100


@pytest.mark.parametrize("key", ["split.seed", "train.seed", "eval.seed", "data.synthetic.seed"])
def test_seeds_are_refused_beyond_what_numpy_pandas_and_torch_take(key: str) -> None:
    """`split.seed=4294967296` passed validation and crashed split_balance with a traceback; set_seed(2**40) raises."""
    section, _, name = key.rpartition(".")
    raw: dict = {}
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = 2**32
    with pytest.raises(ParamsError, match=rf"^params: {key}=4294967296 is not allowed; expected an integer from 0 to"):
        params(raw)
    node[name] = 2**32 - 1
    params(raw)
