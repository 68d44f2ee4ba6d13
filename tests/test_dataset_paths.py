"""Folds.csv comes from a third-party download: its paths never lead outside the dataset or data/raw, and an image
whose path the labels cannot be read from is listed like any other invalid image."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest
from dvc_cli import run, run_json, stages_run
from PIL import Image
from repo_params import params
from ruamel.yaml import YAML

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.data.breakhis import FOLDS_CSV
from medgemma_breakhis.data.split import write_split
from medgemma_breakhis.download.sources import prepare_raw_data

OUTSIDE_IMAGE = "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-77/100X/SOB_B_A-14-77-100-001.png"


def copy_with_rows(synthetic_root_100x: Path, root: Path, filenames: list[str]) -> Path:
    """A copy of the synthetic set (hard links) whose Folds.csv lists `filenames` too, in fold 1 at 100X."""
    shutil.copytree(synthetic_root_100x, root, copy_function=os.link)
    (root / FOLDS_CSV).unlink()  # shared with the session's set by a hard link: replaced, not appended to
    rows = pd.read_csv(synthetic_root_100x / FOLDS_CSV)
    extra = pd.DataFrame({"fold": 1, "mag": 100, "grp": "train", "filename": filenames})
    pd.concat([rows, extra]).to_csv(root / FOLDS_CSV, index=False)
    return root


def save_valid_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (700, 460)).save(path)


def test_paths_leading_outside_are_listed_never_read_or_written(synthetic_root_100x: Path, tmp_path: Path) -> None:
    save_valid_image(tmp_path / "outside" / OUTSIDE_IMAGE)  # a valid image: only its path is wrong
    escaping = {f"../outside/{OUTSIDE_IMAGE}": "'..' segments", str(tmp_path / "outside" / OUTSIDE_IMAGE): "absolute"}
    root = copy_with_rows(synthetic_root_100x, tmp_path / "breakhis", list(escaping))
    raw, excluded = tmp_path / "data" / "raw", tmp_path / "data" / "excluded.csv"

    with pytest.raises(DataError) as caught:
        prepare_raw_data(params({"data": {"source": "local", "path": str(root)}}).data, raw, excluded)
    for filename, reason in escaping.items():
        assert f"{root / filename}: " in str(caught.value) and reason in str(caught.value)

    count = prepare_raw_data(
        params({"data": {"source": "local", "path": str(root), "exclude_invalid": True}}).data, raw, excluded
    )
    listed = pd.read_csv(excluded)
    assert set(listed["filename"]) == set(escaping)
    assert count == pd.read_csv(synthetic_root_100x / FOLDS_CSV)["filename"].nunique()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["excluded.csv", "raw"]  # nothing written beside
    assert not (set(pd.read_csv(raw / FOLDS_CSV)["filename"]) & set(escaping))


def test_paths_without_a_label_or_patient_are_listed_and_excludable(synthetic_root_100x: Path, tmp_path: Path) -> None:
    unknown_type = (
        "BreaKHis_v1/histology_slides/breast/benign/SOB/unknown_type/SOB_B_X_14-88/100X/SOB_B_X-14-88-100-001.png"
    )
    off_pattern = "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-99/100X/photo.png"
    root = copy_with_rows(synthetic_root_100x, tmp_path / "breakhis", [unknown_type, off_pattern])
    for filename in (unknown_type, off_pattern):
        save_valid_image(root / filename)
    raw, excluded = tmp_path / "raw", tmp_path / "excluded.csv"

    with pytest.raises(DataError) as caught:
        prepare_raw_data(params({"data": {"source": "local", "path": str(root)}}).data, raw, excluded)
    assert f"{root / unknown_type}: no tumour-type folder" in str(caught.value)
    assert f"{root / off_pattern}: image file name 'photo.png' does not follow the BreakHis pattern" in str(
        caught.value
    )

    prepare_raw_data(
        params({"data": {"source": "local", "path": str(root), "exclude_invalid": True}}).data, raw, excluded
    )
    assert set(pd.read_csv(excluded)["filename"]) == {unknown_type, off_pattern}
    subsets = write_split(raw / FOLDS_CSV, params().split, tmp_path / "split", tmp_path / "data.json")
    assert len(subsets["train"]) > 0


def test_relative_data_path_is_taken_from_where_the_stage_runs_as_dvc_takes_its_dep(
    synthetic_root_100x: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `${data.path}` is a dep of download: DVC reads a relative one in the workspace it runs the stage in (a --temp or
    # --queue copy, under .dvc/tmp/exps), and the stage reads the same folder
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    (copy / "breakhis").symlink_to(synthetic_root_100x)
    monkeypatch.chdir(copy)
    count = prepare_raw_data(
        params({"data": {"source": "local", "path": "breakhis"}}).data, Path("data/raw"), Path("excluded.csv")
    )
    assert count > 0 and (copy / "data" / "raw" / FOLDS_CSV).is_file()


def test_data_path_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "Folds.csv").write_text("fold,mag,grp,filename\n")
    with pytest.raises(
        DataError,
        match=f"dataset folder {tmp_path / 'Folds.csv'} is a file; set data.path to the folder holding Folds.csv",
    ):
        prepare_raw_data(
            params({"data": {"source": "local", "path": str(tmp_path / "Folds.csv")}}).data,
            tmp_path / "raw",
            tmp_path / "excluded.csv",
        )


def test_output_folders_get_the_umask_mode_not_private(synthetic_root_100x: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        prepare_raw_data(
            params({"data": {"source": "local", "path": str(synthetic_root_100x)}}).data,
            tmp_path / "raw",
            tmp_path / "excluded.csv",
        )
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "raw").stat().st_mode) == 0o755


@pytest.mark.e2e  # the real dvc CLI, in a copy of the reproduced repository
def test_an_edit_to_the_local_copy_re_runs_download(workspace: Path, tmp_path: Path) -> None:
    """feb5c85: with data.source=local, `dvc repro` said everything was up to date after rows or images of the copy
    changed. The copy is a dep of `download` (`${data.path}`), and the other sources add no dep: no column more in
    `dvc exp show`."""
    repo, local = workspace, tmp_path / "breakhis"  # a copy outside the repository, by its absolute path
    shutil.copytree(workspace / "data" / "raw", local)
    yaml = YAML()
    settings = yaml.load(repo / "params.yaml")
    settings["data"]["source"], settings["data"]["path"] = "local", str(local)
    yaml.dump(settings, repo / "params.yaml")
    assert stages_run(run(repo, "dvc", "repro", "download")) == ["download"]
    assert "download" not in run_json(repo, "dvc", "status", "--json")

    folds = pd.read_csv(local / FOLDS_CSV)
    folds.iloc[:-5].to_csv(local / FOLDS_CSV, index=False)  # rows taken out
    assert "download" in run_json(repo, "dvc", "status", "--json")
    assert stages_run(run(repo, "dvc", "repro", "download")) == ["download"]
    assert len(pd.read_csv(repo / "data" / "raw" / FOLDS_CSV)) == len(folds) - 5
    image = local / folds["filename"][0]
    image.write_bytes((local / folds["filename"][1]).read_bytes())  # an image replaced
    assert "download" in run_json(repo, "dvc", "status", "--json")
