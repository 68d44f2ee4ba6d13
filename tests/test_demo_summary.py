from medgemma_breakhis.evaluate.metrics import HEADLINE
from tools.demo_summary import stages_table


def test_stages_table_from_the_metrics_files() -> None:
    metrics = {}
    for stage, accuracy in (("baseline", 0.125), ("probe", 0.5), ("finetuned", 0.875)):
        metrics[stage] = {
            "eight_class": {
                "accuracy": accuracy,
                "accuracy_ci95_low": accuracy - 0.125,
                "accuracy_ci95_high": accuracy + 0.125,
                "f1_weighted": accuracy - 0.1,
            },
            "binary": {
                "accuracy": accuracy + 0.1,
                "accuracy_ci95_low": accuracy,
                "accuracy_ci95_high": accuracy + 0.125,
                "f1_malignant": accuracy + 0.05,
            },
            "patient_level": {"accuracy": accuracy},
            "n_images": 32,
        }
    metrics["finetuned"]["binary"]["roc_auc"] = 0.9375  # the baseline's is missing: n/a, not a crash
    lines = stages_table(metrics).splitlines()
    assert lines[1].split() == ["8-class", "accuracy", "0.125", "0.500", "0.875"]
    assert lines[2].split() == [
        "95%",
        "interval",
        "0.00-0.25",
        "0.38-0.62",
        "0.75-1.00",
    ]  # under the figure it belongs to
    assert ["binary", "ROC-AUC", "n/a", "n/a", "0.938"] in [line.split() for line in lines]
    assert lines[-1].split() == ["test", "images", "32", "32", "32"]
    # one row per headline figure but the unparseable count, one per interval, and the test set's size
    assert len(lines) == 1 + (len(HEADLINE) - 1) + sum(figure.interval for figure in HEADLINE) + 1
