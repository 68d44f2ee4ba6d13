from medgemma_breakhis.evaluate.metrics import HEADLINE
from tools.demo_summary import baseline_finetuned_table


def test_baseline_finetuned_table_from_an_exp_show_row() -> None:
    row = {}
    for stage, accuracy in (("baseline", 0.125), ("finetuned", 0.875)):
        row |= {
            f"metrics/{stage}.json:eight_class.accuracy": accuracy,
            f"metrics/{stage}.json:eight_class.f1_weighted": accuracy - 0.1,
            f"metrics/{stage}.json:binary.accuracy": accuracy + 0.1,
            f"metrics/{stage}.json:binary.f1_malignant": accuracy + 0.05,
            f"metrics/{stage}.json:eight_class.accuracy_ci95_low": accuracy - 0.125,
            f"metrics/{stage}.json:eight_class.accuracy_ci95_high": accuracy + 0.125,
            f"metrics/{stage}.json:binary.accuracy_ci95_low": accuracy,
            f"metrics/{stage}.json:binary.accuracy_ci95_high": accuracy + 0.125,
            f"metrics/{stage}.json:patient_level.accuracy": accuracy,
            f"metrics/{stage}.json:n_images": 32.0,
        }
    row["metrics/finetuned.json:binary.roc_auc"] = 0.9375  # the baseline's is missing: n/a, not a crash
    lines = baseline_finetuned_table(row).splitlines()
    assert lines[1].split() == ["8-class", "accuracy", "0.125", "0.875"]
    assert lines[2].split() == ["95%", "interval", "0.00-0.25", "0.75-1.00"]  # under the figure it belongs to
    assert ["binary", "ROC-AUC", "n/a", "0.938"] in [line.split() for line in lines]
    assert lines[-1].split() == ["test", "images", "32", "32"]
    # one row per headline figure but the unparseable count, one per interval, and the test set's size
    assert len(lines) == 1 + (len(HEADLINE) - 1) + sum(figure.interval for figure in HEADLINE) + 1
