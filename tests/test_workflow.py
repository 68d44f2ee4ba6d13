"""The pull-request workflow: safe to run on anyone's pull request, fork or not."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "pull-request.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return YAML(typ="safe").load(WORKFLOW)


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_actions_are_pinned_by_full_commit_sha(workflow: dict[str, Any]) -> None:
    used = [step["uses"] for step in steps(workflow) if "uses" in step]
    assert used
    for action in used:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), f"{action} is not pinned by commit"


def test_checkout_does_not_leave_the_token_for_the_code_under_test(workflow: dict[str, Any]) -> None:
    (checkout,) = [step for step in steps(workflow) if step.get("uses", "").startswith("actions/checkout@")]
    assert checkout["with"]["persist-credentials"] is False


def test_no_expression_is_pasted_into_a_script(workflow: dict[str, Any]) -> None:
    for step in steps(workflow):
        assert "${{" not in step.get("run", ""), f"{step.get('name')}: pass values through env:, not into run:"
    job_env = next(iter(workflow["jobs"].values()))["env"]
    assert job_env["BASE_REF"] == "${{ github.base_ref }}"


def test_token_is_read_only_but_for_the_comment_which_forks_skip(workflow: dict[str, Any]) -> None:
    assert workflow["permissions"] == {"contents": "read"}
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "pull-requests": "write"}
    assert job["env"]["FROM_FORK"] == "${{ github.event.pull_request.head.repo.full_name != github.repository }}"
    (comment,) = [step for step in job["steps"] if "gh pr comment" in step.get("run", "")]
    assert comment["if"] == "env.FROM_FORK == 'false'"
    (report,) = [step for step in job["steps"] if "make -s report" in step.get("run", "")]
    assert "GITHUB_STEP_SUMMARY" in report["run"]  # a fork's pull request still gets its report


def test_one_run_per_pull_request(workflow: dict[str, Any]) -> None:
    assert workflow["concurrency"] == {
        "group": "pull-request-${{ github.event.pull_request.number }}",
        "cancel-in-progress": True,
    }
