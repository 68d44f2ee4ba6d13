"""Dotted keys (`lora.r`, `binary.accuracy`) over nested dicts: the form DVC and MLflow show params and metrics in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Every leaf of `tree` under its dotted key; a dict is a branch, anything else (lists included) a leaf."""
    flat: dict[str, Any] = {}
    for name, child in tree.items():
        if isinstance(child, Mapping):
            flat.update({f"{name}.{key}": value for key, value in flatten(child).items()})
        else:
            flat[name] = child
    return flat


def get(tree: Mapping[str, Any], key: str) -> Any:
    """The value at `key`, or None where `tree` lacks it (e.g. a metric that one evaluation method does not give)."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def set_in(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` in `tree`, making the dicts on its way as needed."""
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dicts of `flat`'s dotted keys: the inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        set_in(tree, key, value)
    return tree
