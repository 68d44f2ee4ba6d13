"""The linear probe on the tiny model's frozen image features (the baseline stage writes it as the other evaluations:
tests/test_pipeline_e2e.py)."""

from repo_params import params

from medgemma_breakhis.data.breakhis import NUM_CLASSES
from medgemma_breakhis.data.split import read_split
from medgemma_breakhis.evaluate.scoring import probe_predictions


def test_the_probe_tells_the_synthetic_classes_apart_well_above_chance(tiny_model, synthetic_root, split_dir) -> None:
    model, processor, _ = tiny_model
    test = read_split(split_dir / "test.csv", synthetic_root)
    train = read_split(split_dir / "train.csv", synthetic_root)
    predictions = probe_predictions(model, processor, test, synthetic_root, params().eval, train=train)
    accuracy = (predictions["true_class"] == predictions["predicted_class"]).mean()
    assert accuracy >= 0.5 > 1 / NUM_CLASSES, accuracy
    assert predictions["filename"].tolist() == test["filename"].tolist()
