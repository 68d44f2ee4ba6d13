"""Shared fixtures: hand-made Folds.csv rows, a small synthetic dataset and the tiny model, all built locally."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medgemma_breakhis.data import FOLDS_CSV
from medgemma_breakhis.modeling import load_base_model
from medgemma_breakhis.params import ModelParams, SyntheticData
from medgemma_breakhis.synthetic import generate_synthetic_breakhis


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic BreakHis copy (two images per benign patient and magnification, three per malignant)."""
    return generate_synthetic_breakhis(tmp_path_factory.mktemp("breakhis"), SyntheticData(images_per_patient=2))


@pytest.fixture(scope="session")
def synthetic_folds(synthetic_root: Path) -> pd.DataFrame:
    return pd.read_csv(synthetic_root / FOLDS_CSV)


@pytest.fixture(scope="session")
def tiny_model():
    """(model, processor, info) of the tiny random Gemma 3, in fp32 so comparisons are exact."""
    return load_base_model(ModelParams(id="tiny-gemma3"), "fp32")
