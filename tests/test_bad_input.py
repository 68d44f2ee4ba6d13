"""Bad input stops a stage early with a message that says what to fix, and leaves no output behind."""

import re
from pathlib import Path

import pytest
from repo_params import params, write_params
from ruamel.yaml import YAML

from medgemma_breakhis.core.errors import DataError, ParamsError
from medgemma_breakhis.download.sources import prepare_raw_data
from medgemma_breakhis.model.load import ModelLoadError, load_base_model
from stages import download


def test_kaggle_without_network_or_credentials_says_what_to_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    expected = r"ambarish/breakhis.*credentials were NOT found.*KAGGLE_USERNAME and KAGGLE_KEY"
    with pytest.raises(DataError, match=expected):
        prepare_raw_data(params({"data": {"source": "kaggle"}}).data, tmp_path / "raw", tmp_path / "excluded.csv")
    assert not (tmp_path / "raw").exists()


def test_local_source_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'} does not exist; set data.path"):
        prepare_raw_data(
            params({"data": {"source": "local", "path": str(tmp_path / "nowhere")}}).data,
            tmp_path / "raw",
            tmp_path / "excluded.csv",
        )


def test_gated_model_without_token_says_what_to_set(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ModelLoadError, match=r"(?s)google/medgemma-4b-it.*no Hugging Face token was found.*HF_TOKEN"):
        load_base_model(params().model, "bf16")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora:\n  r: 0\n", "lora.r=0 is not allowed"),
        ("train:\n  precision: fp8\n", "train.precision='fp8' is not allowed; expected one of bf16, fp16, fp32"),
        ("split:\n  fold: 9\n", "split.fold=9 is not allowed"),
        ("unknown_section: 1\n", "unknown key unknown_section"),
    ],
)
def test_stage_refuses_bad_params_before_any_work(stage_folder: Path, override: str, message: str) -> None:
    write_params(stage_folder, YAML(typ="safe").load(override))
    with pytest.raises(ParamsError, match=re.escape(message)):
        download.main(["--out", "data/raw", "--excluded", "data/excluded.csv"])
    assert not (stage_folder / "data").exists()
