import pytest

from medgemma_breakhis.data.breakhis import CLASS_NAMES, is_malignant, label_from_path, patient_from_path
from medgemma_breakhis.model.prompt import PROMPT

REAL_EXAMPLE = (
    "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png"
)


@pytest.mark.parametrize(
    ("folder", "label"),
    [
        ("benign/SOB/adenosis", 0),
        ("benign/SOB/fibroadenoma", 1),
        ("benign/SOB/phyllodes_tumor", 2),
        ("benign/SOB/tubular_adenoma", 3),
        ("malignant/SOB/ductal_carcinoma", 4),
        ("malignant/SOB/lobular_carcinoma", 5),
        ("malignant/SOB/mucinous_carcinoma", 6),
        ("malignant/SOB/papillary_carcinoma", 7),
    ],
)
def test_label_from_tumour_folder(folder: str, label: int) -> None:
    path = f"BreaKHis_v1/histology_slides/breast/{folder}/SOB_X_14-1/100X/SOB_X-14-1-100-001.png"
    assert label_from_path(path) == label
    assert is_malignant(label) == folder.startswith("malignant")


def test_label_accepts_windows_separators_and_case() -> None:
    assert label_from_path(REAL_EXAMPLE.replace("/", "\\").replace("adenosis", "Adenosis")) == 0


def test_label_of_unknown_folder_names_the_path() -> None:
    with pytest.raises(ValueError, match="breast/benign/SOB/other/x.png"):
        label_from_path("breast/benign/SOB/other/x.png")


def test_patient_is_third_hyphen_field() -> None:
    assert patient_from_path(REAL_EXAMPLE) == "22549AB"
    assert patient_from_path("a/b/SOB_M_DC-14-2523-400-012.png") == "2523"


def test_patient_of_unexpected_file_name_names_it() -> None:
    with pytest.raises(ValueError, match="image_001.png"):
        patient_from_path("benign/adenosis/image_001.png")


def test_prompt_lists_the_eight_classes_in_label_order() -> None:
    for label, name in enumerate(CLASS_NAMES):
        assert f"{label}: {name}\n" in PROMPT
    assert PROMPT.endswith("Answer with only the number (0-7):")
