import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from repo_params import params

from medgemma_breakhis.core.errors import DataError
from medgemma_breakhis.data.breakhis import CLASS_NAMES, label_from_path, patient_from_path, read_folds
from medgemma_breakhis.data.split import read_split, select_split, split_summary, write_split
from medgemma_breakhis.download.sources import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    find_image_root,
    import_dataset,
    synthetic_filename,
)


def reference_selection(folds: pd.DataFrame, fold: int, mag: int, seed: int) -> tuple[list[str], list[str]]:
    """The blog's code (docs/reference-experiment.md#data), verbatim but for the parameters."""
    folds_100x = folds[folds["mag"] == mag]
    folds_100x = folds_100x[folds_100x["fold"] == fold]
    folds_100x_test = folds_100x[folds_100x.grp == "test"]
    folds_100x_train = folds_100x[folds_100x.grp == "train"]
    out = []
    for part in (folds_100x_train, folds_100x_test):
        benign = part[part["filename"].str.contains("benign")]
        malignant = part[part["filename"].str.contains("malignant")]
        n = min(len(benign), len(malignant))
        out.append(
            list(
                pd.concat([benign.sample(n=n, random_state=seed), malignant.sample(n=n, random_state=seed)])[
                    "filename"
                ].values
            )
        )
    return out[0], out[1]


def hand_made_folds() -> pd.DataFrame:
    """Two folds, two magnifications, imbalanced, rows deliberately not sorted by class."""
    rows = []
    for fold in (1, 2):
        for label, patients, images in (
            (4, ("11", "12", "13"), 5),
            (0, ("21", "22"), 3),
            (6, ("31",), 4),
            (2, ("41", "42"), 2),
        ):
            for p_index, patient in enumerate(patients):
                group = "test" if (p_index + fold) % 2 == 0 else "train"
                for mag in (100, 40):
                    for seq in range(1, images + 1):
                        rows.append(
                            {
                                "fold": fold,
                                "mag": mag,
                                "grp": group,
                                "filename": synthetic_filename(label, patient, mag, seq),
                            }
                        )
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("fold", "mag", "seed"), [(1, 100, 42), (2, 100, 7), (1, 40, 0)])
def test_selection_is_exactly_the_reference_selection(fold: int, mag: int, seed: int) -> None:
    folds = hand_made_folds()
    subsets = select_split(folds, params({"split": {"fold": fold, "magnification": mag, "seed": seed}}).split)
    train, test = reference_selection(folds, fold, mag, seed)
    assert list(subsets["train"]["filename"]) == train
    assert list(subsets["test"]["filename"]) == test


def test_selection_on_synthetic_folds_matches_reference(synthetic_folds: pd.DataFrame) -> None:
    subsets = select_split(synthetic_folds, params().split)
    train, test = reference_selection(synthetic_folds, 1, 100, 42)
    assert list(subsets["train"]["filename"]) == train and list(subsets["test"]["filename"]) == test


def test_selection_rows_carry_label_class_and_patient() -> None:
    subsets = select_split(hand_made_folds(), params().split)
    for rows in subsets.values():
        assert list(rows.columns) == ["filename", "label", "class_name", "patient"]
        assert list(rows["label"]) == [label_from_path(f) for f in rows["filename"]]
        assert list(rows["class_name"]) == [CLASS_NAMES[label] for label in rows["label"]]
        assert list(rows["patient"]) == [patient_from_path(f) for f in rows["filename"]]
        assert (rows["label"] >= 4).sum() == (rows["label"] < 4).sum()  # balanced benign/malignant


def test_unbalanced_selection_keeps_every_row_in_folds_order() -> None:
    folds = hand_made_folds()
    subsets = select_split(folds, params({"split": {"balance": "none"}}).split)
    expected = folds[(folds["mag"] == 100) & (folds["fold"] == 1) & (folds["grp"] == "train")]["filename"]
    assert list(subsets["train"]["filename"]) == list(expected)


def test_patient_in_train_and_test_is_refused_with_every_image_of_it() -> None:
    folds = hand_made_folds()
    train = folds[(folds["fold"] == 1) & (folds["mag"] == 100) & (folds["grp"] == "train")]
    leaked_patients = train["filename"].map(patient_from_path).unique()[:2]
    moved = (
        train[train["filename"].map(patient_from_path).isin(leaked_patients)]
        .groupby(train["filename"].map(patient_from_path))
        .head(1)
    )  # one image of each of two patients moved to test
    leaky = pd.concat([folds.drop(moved.index), moved.assign(grp="test")])
    with pytest.raises(DataError) as caught:
        select_split(leaky, params({"split": {"balance": "none"}}).split)
    message = str(caught.value)
    assert message.startswith(
        f"2 patient(s) are in both train and test of fold 1 at 100X: {', '.join(sorted(leaked_patients))}."
    )
    for patient in leaked_patients:
        images = train[train["filename"].map(patient_from_path) == patient]["filename"]
        for filename in images:
            group = "test" if filename in set(moved["filename"]) else "train"
            assert f"patient {patient}, {group}: {filename}" in message


def test_data_summary_counts_images_and_patients_per_split_and_class() -> None:
    subsets = select_split(hand_made_folds(), params({"split": {"balance": "none"}}).split)
    summary = split_summary(subsets)
    for group, rows in subsets.items():
        figures = summary[group]
        assert figures["images"] == len(rows)
        assert figures["patients"] == rows["patient"].nunique()
        assert sum(c["images"] for c in figures["per_class"].values()) == len(rows)
        assert set(figures["per_class"]) == set(CLASS_NAMES)
    # fold 1, 100X, train in hand_made_folds: patients 11 and 13 (5 images each), 31 (4), 21 (3), 41 (2)
    train = summary["train"]
    assert train["per_class"]["malignant_ductal_carcinoma"] == {"images": 10, "patients": 2}
    assert train["per_class"]["benign_adenosis"] == {"images": 3, "patients": 1}
    assert train["per_class"]["benign_fibroadenoma"] == {"images": 0, "patients": 0}
    assert train["images_per_patient"] == {"min": 2, "median": 4.0, "max": 5}


def test_write_then_read_split(tmp_path: Path, synthetic_root: Path) -> None:
    write_split(synthetic_root / "Folds.csv", params().split, tmp_path / "split", tmp_path / "data.json")
    test = read_split(tmp_path / "split" / "test.csv", synthetic_root)
    assert len(test) > 0 and all(isinstance(p, str) for p in test["patient"])


def test_read_folds_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'Folds.csv'} not found"):
        read_folds(tmp_path / "Folds.csv")
    bad = tmp_path / "Folds.csv"
    bad.write_text("fold,mag,filename\n1,100,a.png\n")
    with pytest.raises(DataError, match=r"Folds.csv lacks column\(s\) grp"):
        read_folds(bad)
    bad.write_text("fold,mag,grp,filename\n1,100,train,a.png\n7,100,train,b.png\n1,100,validation,c.png\n")
    with pytest.raises(DataError) as malformed:
        read_folds(bad)
    assert str(malformed.value) == (
        f"{bad} is malformed: 1 row(s) with a fold outside [1, 2, 3, 4, 5], first at row 3: 7,100,train,b.png; "
        "1 row(s) with a grp outside ['test', 'train'], first at row 4: 1,100,validation,c.png"
    )
    bad.write_text("")
    with pytest.raises(DataError, match="not a readable CSV"):
        read_folds(bad)


def test_repeated_folds_csv_rows_are_refused_in_one_line_naming_the_first(
    synthetic_root_100x: Path, tmp_path: Path
) -> None:
    """feb5c85 read them as they came: repeated test rows doubled the test set, a file repeated 100 times gave 100
    times the training set."""
    folds = pd.read_csv(synthetic_root_100x / "Folds.csv")
    repeated = pd.concat([folds, folds.iloc[[3]], folds.iloc[[7] * 100]], ignore_index=True)
    repeated.to_csv(tmp_path / "Folds.csv", index=False)
    with pytest.raises(DataError) as refused:
        read_folds(tmp_path / "Folds.csv")
    message, first = str(refused.value), len(folds) + 2  # rows are numbered from 1, after the header
    assert "\n" not in message and message.startswith(f"{tmp_path / 'Folds.csv'} is malformed: ")
    assert message.endswith(
        "101 row(s) with the fold, mag, grp and filename of an earlier row, first at row "
        f"{', '.join(str(first + i) for i in range(5))}: {','.join(map(str, folds.iloc[3]))}"
    )
    other_fold = pd.concat([folds, folds.iloc[[3]].assign(fold=2)], ignore_index=True)  # one image in another fold
    other_fold.to_csv(tmp_path / "Folds.csv", index=False)
    assert len(read_folds(tmp_path / "Folds.csv")) == len(folds) + 1


def test_a_folds_csv_with_only_its_header_is_refused_as_listing_no_images(tmp_path: Path) -> None:
    """feb5c85 read it as an empty table: `download` then said no filename in Folds.csv is a relative path."""
    (tmp_path / "Folds.csv").write_text("fold,mag,grp,filename\n")
    with pytest.raises(DataError, match=r"^\S+Folds.csv lists no images: it has its header and no rows$"):
        read_folds(tmp_path / "Folds.csv")
    with pytest.raises(DataError, match="lists no images"):
        import_dataset(tmp_path, tmp_path / "raw", False, tmp_path / "excluded.csv")


def test_image_root_found_one_level_down_as_in_the_kaggle_download(tmp_path: Path) -> None:
    filename = synthetic_filename(0, "1", 100, 1)
    image = tmp_path / "BreaKHis_v1" / filename
    image.parent.mkdir(parents=True)
    image.touch()
    assert find_image_root(tmp_path, [filename]) == tmp_path / "BreaKHis_v1"


def test_image_root_not_found_lists_the_paths_tried(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not at any of: .*/x/a.png, .*/BreaKHis_v1/x/a.png"):
        find_image_root(tmp_path, ["x/a.png"])


def test_import_of_kaggle_layout_normalises_it_and_reports_missing_images(tmp_path: Path, synthetic_root: Path) -> None:
    download = tmp_path / "download"
    (download / "BreaKHis_v1").mkdir(parents=True)
    (download / "Folds.csv").write_bytes((synthetic_root / "Folds.csv").read_bytes())
    shutil.copytree(synthetic_root / "BreaKHis_v1", download / "BreaKHis_v1" / "BreaKHis_v1", copy_function=os.link)
    count = import_dataset(download, tmp_path / "raw", False, tmp_path / "excluded.csv")
    folds = read_folds(tmp_path / "raw" / "Folds.csv")
    assert count == folds["filename"].nunique()
    assert all((tmp_path / "raw" / f).is_file() for f in folds["filename"])

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "Folds.csv").write_bytes((synthetic_root / "Folds.csv").read_bytes())
    shutil.copytree(synthetic_root / "BreaKHis_v1", broken / "BreaKHis_v1", copy_function=os.link)
    (broken / "extra.csv").write_text("")
    missing = synthetic_filename(7, "missing", 100, 1)
    with (broken / "Folds.csv").open("a") as stream:
        stream.write(f"1,100,train,{missing}\n")
    with pytest.raises(DataError, match=rf"1 of \d+ listed image\(s\) cannot be used:\n  .*{missing}: missing"):
        import_dataset(broken, tmp_path / "raw2", False, tmp_path / "excluded2.csv")
    assert not (tmp_path / "raw2").exists()  # nothing half-written left behind


def test_synthetic_layout_is_breakhis(synthetic_root: Path, synthetic_folds: pd.DataFrame) -> None:
    assert list(synthetic_folds.columns) == ["fold", "mag", "grp", "filename"]
    assert set(synthetic_folds["mag"]) == {40, 100, 200, 400} and set(synthetic_folds["fold"]) == {1, 2, 3, 4, 5}
    per_image = synthetic_folds.groupby("filename")["fold"].apply(sorted)
    assert all(folds == [1, 2, 3, 4, 5] for folds in per_image)  # every image once per fold, as in Kaggle's file
    for fold, rows in synthetic_folds.groupby("fold"):
        patients = rows.assign(patient=rows["filename"].map(patient_from_path))
        train = set(patients[patients.grp == "train"]["patient"])
        test = set(patients[patients.grp == "test"]["patient"])
        assert not train & test, f"fold {fold} leaks patients"
        assert set(patients[patients.grp == "test"]["filename"].map(label_from_path)) == set(range(8))
    with Image.open(synthetic_root / synthetic_folds["filename"].iloc[0]) as image:
        assert image.size == (IMAGE_WIDTH, IMAGE_HEIGHT) and image.mode == "RGB"


def test_synthetic_set_at_one_magnification_is_that_part_of_the_full_set_byte_for_byte(
    synthetic_root_100x: Path, synthetic_root: Path, synthetic_folds: pd.DataFrame
) -> None:
    """Drawing fewer magnifications changes no image: each depends on the seed and what it is, not on the others."""
    part = synthetic_root_100x  # drawn with magnifications=(100,) alone
    folds = pd.read_csv(part / "Folds.csv")
    assert folds.equals(synthetic_folds[synthetic_folds["mag"] == 100].reset_index(drop=True))
    drawn = sorted(p.relative_to(part).as_posix() for p in part.rglob("*.png"))
    assert drawn == sorted(set(folds["filename"])) and len(drawn) == 4 * 5 * 2 + 4 * 5 * 3  # benign 2, malignant 3
    assert all((part / f).read_bytes() == (synthetic_root / f).read_bytes() for f in drawn)
    for fold in range(1, 6):  # cross-validation's five folds all select from it, every class in every test set
        assert set(select_split(folds, params({"split": {"fold": fold}}).split)["test"]["label"]) == set(
            range(len(CLASS_NAMES))
        )


def test_synthetic_classes_differ_in_pixels(synthetic_root: Path, synthetic_folds: pd.DataFrame) -> None:
    """Mean colour alone separates the classes: the offline run has something real to learn."""
    first_per_class = (
        synthetic_folds.drop_duplicates("filename")
        .assign(label=lambda f: f["filename"].map(label_from_path))
        .groupby("label")["filename"]
        .first()
    )
    means = [np.asarray(Image.open(synthetic_root / f)).reshape(-1, 3).mean(axis=0) for f in first_per_class]
    distances = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(distances) > 20
