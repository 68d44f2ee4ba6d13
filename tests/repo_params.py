"""The repository's params.yaml, the one source of values, with a test's own values merged over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from medgemma_breakhis.core.params import Params, params_from_dict

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"
OFFLINE = {"data": {"source": "synthetic"}, "model": {"id": "tiny-gemma3"}}


def merged(base: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """`base` with `raw`'s values in place of its own, section by section."""
    out = dict(base)
    for key, value in raw.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def raw_params(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    return merged(YAML(typ="safe").load(PARAMS_YAML), raw or {})


def params(raw: dict[str, Any] | None = None) -> Params:
    """The repository's params with `raw` (nested, as in params.yaml) merged over them, validated."""
    return params_from_dict(raw_params(raw))


def write_params(folder: Path, raw: dict[str, Any] | None = None) -> Path:
    """A complete params.yaml in `folder`: the repository's, with `raw` merged over it."""
    path = folder / "params.yaml"
    YAML(typ="safe").dump(raw_params(raw), path)
    return path
