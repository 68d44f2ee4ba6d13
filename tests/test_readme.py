"""The README and the metrics guide name only what exists: make targets, model ids, metrics; and every make target
and built-in model is in the README."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from repo_params import params

from medgemma_breakhis.core.params import RANDOM_MEDGEMMA_ID, TINY_MODEL_ID, flatten
from medgemma_breakhis.evaluate.metrics import HEADLINE, evaluation_metrics, predictions_frame
from tools.demo_summary import ROWS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
METRICS_GUIDE = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")


def code(text: str) -> str:
    """The code blocks and inline code of a markdown text, where commands and keys are written."""
    blocks = re.findall(r"```.*?\n(.*?)```", text, flags=re.DOTALL)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return "\n".join(blocks + spans)


def make_targets() -> set[str]:
    """The targets `make help` lists: those with a `##` description."""
    return set(re.findall(r"^([a-z][a-z-]*):.*## ", (REPO / "Makefile").read_text(), flags=re.MULTILINE))


def test_the_readme_names_every_make_target_and_no_other() -> None:
    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", code(README)))
    assert named <= make_targets(), f"not targets of the Makefile: {sorted(named - make_targets())}"
    assert make_targets() <= named, f"targets the README never names: {sorted(make_targets() - named)}"


def test_the_readme_names_every_built_in_model_and_only_model_ids_that_load() -> None:
    for model_id in (TINY_MODEL_ID, RANDOM_MEDGEMMA_ID):
        assert f"`{model_id}`" in README, model_id
    for model_id in re.findall(r"model\.id=([^\s`'\"]+)", code(README)):
        assert params({"model": {"id": model_id}}).model.kind in ("built-in", "hub"), model_id


def test_the_demo_table_in_the_readme_is_the_one_demo_summary_prints() -> None:
    table = README.split("prints a table\nlike this one", 1)[1].split("```", 2)[1]
    labels = [re.split(r"\s{2,}", line.strip())[0] for line in table.strip().splitlines()[1:]]
    assert labels == [label.strip() for label, _ in ROWS]


@pytest.fixture(scope="module")
def metrics_keys() -> set[str]:
    """Every key of a metrics file, from hand-made predictions with probabilities (what `score` writes)."""
    labels, predicted = [0, 1, 4, 5, 0, 4], [0, 2, 4, 4, 0, 1]
    rows = pd.DataFrame({"filename": [f"{i}.png" for i in range(6)], "patient": list("aabbcd"), "label": labels})
    probabilities = np.full((6, 8), 0.1 / 7)
    probabilities[np.arange(6), predicted] = 0.9
    metrics = evaluation_metrics(predictions_frame(rows, np.array(predicted), probabilities), resamples=100, seed=0)
    return set(flatten(metrics))


def inline_code(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL)))


def test_every_metric_the_guides_name_is_written_and_every_headline_figure_is_explained(metrics_keys) -> None:
    pattern = r"(eight_class|binary|patient_level)\.[a-z_0-9.]+|n_images|n_unparseable"
    named = {span for span in inline_code(README) | inline_code(METRICS_GUIDE) if re.fullmatch(pattern, span)}
    assert len(named) > len(HEADLINE)
    assert named <= metrics_keys, f"named but never written: {sorted(named - metrics_keys)}"
    for figure in HEADLINE:
        assert figure.key in inline_code(METRICS_GUIDE), figure.key


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.DOTALL), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
)
def test_every_link_between_the_guides_leads_somewhere(page: str) -> None:
    source = REPO / page
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        assert linked.exists(), f"{page}: {target} leads nowhere"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked.read_text(encoding="utf-8")), f"{page}: no heading for {target}"
