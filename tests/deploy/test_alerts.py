"""docs/alerts.yml: rules Prometheus loads, that fire when they should, on metrics that exist.

A rule Prometheus refuses, or one written against a metric the server does not
export, fails silently in a clinic's monitoring: nobody is paged. `promtool`
(Debian's `prometheus` package, installed by testkit.tools) checks the file and runs
tests/deploy/alerts_test.yml; the rest is checked against the code and the docs.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from server.metrics import Metrics
from testkit.harness import REPO
from testkit.tools import ensure_promtool

RULES = REPO / "docs" / "alerts.yml"
RULE_TESTS = REPO / "tests" / "deploy" / "alerts_test.yml"
OPERATIONS = REPO / "docs" / "operations.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    reasons: list[str] = []
    path = ensure_promtool(reasons)
    if path is None:
        pytest.skip(reasons[0])
    return path


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules_and_their_tests_pass(promtool: str) -> None:
    assert "SUCCESS" in run(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in run(promtool, "test", "rules", str(RULE_TESTS))


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_every_alert_is_explained_in_operations_with_its_runbook_anchor() -> None:
    """Whoever is paged opens the runbook first: it must exist and say what to do."""
    text = OPERATIONS.read_text()
    headings = set(re.findall(r"^#### (\w+)$", text, re.MULTILINE))
    rules = RULES.read_text()
    names = alert_names()
    assert len(names) == len(set(names)) > 10
    for name in names:
        assert name in headings, f"{name} has no `#### {name}` in docs/operations.md"
        assert f'runbook: "docs/operations.md#{name.lower()}"' in rules, name


def test_every_metric_an_alert_uses_is_exported() -> None:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    used = set(re.findall(r"\b((?:slotcast|process)_\w+)", RULES.read_text()))
    assert used, "no metric found in the rules"
    assert used <= exported, used - exported
