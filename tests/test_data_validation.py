"""Bad data stops `download` with every offending file listed, or is left out and reported when the params allow it."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from repo_params import params as with_params
from repo_params import write_params

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.data.breakhis import FOLDS_CSV, read_folds
from medgemma_breakhis.data.split import read_split
from medgemma_breakhis.download.sources import prepare_raw_data
from stages import download

MISLABELLED = (
    "BreaKHis_v1/histology_slides/breast/benign/SOB/ductal_carcinoma/SOB_B_DC_14-999/100X/SOB_B_DC-14-999-100-001.png"
)


def _replace(path: Path, write) -> None:
    path.unlink()  # the copy shares its files with the session's synthetic set by hard links
    write(path)


@pytest.fixture
def bad_copy(synthetic_root_100x: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the synthetic set with one image of each kind of problem, and the reason expected for each."""
    root = tmp_path / "breakhis"
    shutil.copytree(synthetic_root_100x, root, copy_function=os.link)
    _replace(root / FOLDS_CSV, lambda p: shutil.copy2(synthetic_root_100x / FOLDS_CSV, p))  # appended to below
    listed = pd.read_csv(root / FOLDS_CSV)["filename"].unique()
    corrupt, truncated, small, grey, missing = listed[:5]
    _replace(root / corrupt, lambda p: p.write_bytes(b"this is not a PNG"))
    data = (synthetic_root_100x / truncated).read_bytes()
    _replace(root / truncated, lambda p: p.write_bytes(data[: len(data) // 2]))
    _replace(root / small, lambda p: Image.new("RGB", (100, 100)).save(p))
    _replace(root / grey, lambda p: Image.new("L", (700, 460)).save(p))
    (root / missing).unlink()
    (root / MISLABELLED).parent.mkdir(parents=True)
    Image.new("RGB", (700, 460)).save(root / MISLABELLED)
    with (root / FOLDS_CSV).open("a") as stream:
        stream.write(f"1,100,train,{MISLABELLED}\n")
    return root, {
        corrupt: "does not decode",
        truncated: "does not decode",
        small: "size 100x100, expected 700x460",
        grey: "mode L, expected RGB",
        missing: "missing",
        MISLABELLED: "its tumour type is malignant but it is not under /malignant/",
    }


def test_every_bad_image_is_listed_and_nothing_is_written(bad_copy, tmp_path: Path) -> None:
    root, expected = bad_copy
    with pytest.raises(DataError) as caught:
        prepare_raw_data(
            with_params({"data": {"source": "local", "path": str(root)}}).data,
            tmp_path / "raw",
            tmp_path / "excluded.csv",
        )
    message = str(caught.value)
    assert message.startswith(f"{len(expected)} of ")
    for filename, reason in expected.items():
        assert f"{root / filename}: {reason}" in message
    assert "set data.exclude_invalid=true" in message
    assert not (tmp_path / "raw").exists() and not (tmp_path / "excluded.csv").exists()


def test_excluded_images_are_left_out_and_reported_with_the_reason(bad_copy, tmp_path: Path) -> None:
    root, expected = bad_copy
    params = with_params({"data": {"source": "local", "path": str(root), "exclude_invalid": True}}).data
    count = prepare_raw_data(params, tmp_path / "raw", tmp_path / "excluded.csv")
    report = pd.read_csv(tmp_path / "excluded.csv")
    reported = dict(zip(report["filename"], report["reason"]))
    assert set(reported) == set(expected)
    assert all(reported[f].startswith(reason) for f, reason in expected.items()), reported
    kept = read_folds(tmp_path / "raw" / FOLDS_CSV)
    assert count == kept["filename"].nunique()
    assert not set(expected) & set(kept["filename"])
    assert all((tmp_path / "raw" / f).is_file() for f in kept["filename"].unique())


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of 45 bytes whose header declares `width` x `height` RGB pixels (and that holds none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def test_hostile_files_are_listed_and_excluded_never_crashing_nor_decoded_nor_followed(
    synthetic_root_100x: Path, tmp_path: Path
) -> None:
    """852abeb: a tiny PNG declaring 30000x30000 crashed `download` (DecompressionBombError) even with
    data.exclude_invalid; a 12000x12000 one was decoded whole before its size was refused; a too-long path crashed it
    (Errno 36); a symlink out of the dataset was read and hard-linked into data/raw."""
    root = tmp_path / "breakhis"
    shutil.copytree(synthetic_root_100x, root, copy_function=os.link)
    _replace(root / FOLDS_CSV, lambda p: shutil.copy2(synthetic_root_100x / FOLDS_CSV, p))
    bomb, huge, linked = pd.read_csv(root / FOLDS_CSV)["filename"].unique()[:3]
    _replace(root / bomb, lambda p: p.write_bytes(png_declaring(30000, 30000)))
    _replace(root / huge, lambda p: p.write_bytes(png_declaring(12000, 12000)))
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    shutil.copy2(synthetic_root_100x / linked, outside)  # a valid image: only where it is makes it wrong
    _replace(root / linked, lambda p: p.symlink_to(outside))
    too_long = str(Path(bomb).parent / ("SOB_B_A-14-22549AB-100-" + "9" * 300 + ".png"))
    with (root / FOLDS_CSV).open("a") as stream:
        stream.write(f"1,100,train,{too_long}\n")

    params = with_params({"data": {"source": "local", "path": str(root), "exclude_invalid": True}}).data
    prepare_raw_data(params, tmp_path / "raw", tmp_path / "excluded.csv")
    report = pd.read_csv(tmp_path / "excluded.csv")
    reasons = dict(zip(report["filename"], report["reason"]))
    assert set(reasons) == {bomb, huge, linked, too_long}
    assert reasons[bomb].startswith("declares more pixels than are safe to decode: Image size (900000000 pixels)")
    assert reasons[huge] == "size 12000x12000, expected 700x460"  # from the header: 852abeb decoded it first
    assert reasons[linked].startswith(f"a symlink to {outside}, outside the dataset folder")
    assert reasons[too_long].startswith("cannot be looked up: [Errno 36] File name too long")
    assert not (tmp_path / "raw" / linked).exists()


def test_download_stage_stops_on_bad_data(bad_copy, stage_folder: Path) -> None:
    root, _ = bad_copy
    write_params(stage_folder, {"data": {"source": "local", "path": str(root)}})
    with pytest.raises(DataError, match=r"^6 of .* cannot be used"):
        download.main(["--out", "data/raw", "--excluded", "data/excluded_images.csv"])
    assert not (stage_folder / "data").exists()


def test_truncated_folds_csv_is_refused(synthetic_root_100x: Path, tmp_path: Path) -> None:
    text = (synthetic_root_100x / FOLDS_CSV).read_text()
    (tmp_path / FOLDS_CSV).write_text(text[: len(text) // 2].rsplit(",", 1)[0])  # cut inside a row
    with pytest.raises(DataError, match=r"Folds.csv is malformed: .*row \d+"):
        read_folds(tmp_path / FOLDS_CSV)


def test_thousands_of_missing_images_are_listed_twenty_then_counted(synthetic_root_100x: Path, tmp_path: Path) -> None:
    """feb5c85 listed every one: 100,000 missing images made a 14 MB error of 100,002 lines. The same cap holds for
    the images of a split (`read_split`)."""
    root = tmp_path / "breakhis"
    shutil.copytree(synthetic_root_100x, root, copy_function=os.link)
    folds = pd.read_csv(root / FOLDS_CSV)
    first = Path(folds["filename"][0])
    missing = [f"{first.parent}/gone-{i}/{first.name}" for i in range(5000)]
    listed = pd.concat([folds, pd.DataFrame({"fold": 1, "mag": 100, "grp": "train", "filename": missing})])
    _replace(root / FOLDS_CSV, lambda p: listed.to_csv(p, index=False))
    with pytest.raises(DataError) as refused:
        prepare_raw_data(
            with_params({"data": {"source": "local", "path": str(root)}}).data, tmp_path / "raw", tmp_path / "x.csv"
        )
    lines = str(refused.value).splitlines()
    assert lines[0] == f"5000 of {folds['filename'].nunique() + 5000} listed image(s) cannot be used:"
    assert lines[1:21] == [f"  {root / name}: missing" for name in missing[:20]]
    assert lines[21] == "  … and 4980 more" and len(lines) == 23 and lines[22].startswith("Fix or re-download them")

    split = tmp_path / "train.csv"
    pd.DataFrame({"filename": missing, "label": 0, "class_name": "benign_adenosis", "patient": "1"}).to_csv(split)
    with pytest.raises(DataError) as refused:
        read_split(split, root)
    lines = str(refused.value).splitlines()
    assert lines[0] == "5000 image(s) listed in Folds.csv are missing:" and lines[21] == "  … and 4980 more"
    assert len(lines) == 22
