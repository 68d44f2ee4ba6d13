"""data.source=kaggle through kagglehub, whose download call alone is replaced by a local folder in Kaggle's layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from repo_params import params

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.data.breakhis import FOLDS_CSV
from medgemma_breakhis.download.sources import prepare_raw_data


@pytest.fixture(scope="module")
def kaggle_cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What kagglehub's cache holds for ambarish/breakhis: Folds.csv at the top, the images one BreaKHis_v1/ deeper
    than Folds.csv's paths say (docs/breakhis.md#on-kaggle)."""
    root = tmp_path_factory.mktemp("kagglehub") / "datasets" / "ambarish" / "breakhis" / "versions" / "4"
    root.mkdir(parents=True)
    shutil.copy2(synthetic_root / FOLDS_CSV, root / FOLDS_CSV)
    shutil.copytree(synthetic_root / "BreaKHis_v1", root / "BreaKHis_v1" / "BreaKHis_v1")
    return root


def test_kaggle_download_is_imported_from_the_cache_without_a_second_copy(
    kaggle_cache: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = []

    def dataset_download(handle: str, **kwargs) -> str:
        calls.append((handle, kwargs))
        return str(kaggle_cache)

    monkeypatch.setattr("kagglehub.dataset_download", dataset_download)
    count = prepare_raw_data(params({"data": {"source": "kaggle"}}).data, tmp_path / "raw", tmp_path / "excluded.csv")
    assert calls == [("ambarish/breakhis", {})]  # no force_download: kagglehub reuses its cache
    folds = pd.read_csv(tmp_path / "raw" / FOLDS_CSV)
    assert count == folds["filename"].nunique() > 0
    for filename in folds["filename"].unique()[:20]:
        imported = tmp_path / "raw" / filename  # the path Folds.csv gives, without the extra level
        assert imported.stat().st_ino == (kaggle_cache / "BreaKHis_v1" / filename).stat().st_ino  # a hard link


def test_kaggle_network_failure_says_what_to_check(tmp_path: Path, monkeypatch) -> None:
    def dataset_download(handle: str, **kwargs) -> str:
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr("kagglehub.dataset_download", dataset_download)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    with pytest.raises(
        DataError,
        match=r"(?s)'ambarish/breakhis' failed: Failed to resolve 'www.kaggle.com'.*"
        r"Kaggle credentials were found.*check network access",
    ):
        prepare_raw_data(params({"data": {"source": "kaggle"}}).data, tmp_path / "raw", tmp_path / "excluded.csv")
    assert not (tmp_path / "raw").exists()
