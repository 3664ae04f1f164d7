"""The project's documents state facts the tests can check: every test they name
exists under that name, every command they show names a real script, and they speak
of the project only (no work diary, no machine's temporary paths)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "RELIABILITY.md", "BENCHMARKS.md"]


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every ``tests/x.py::name`` in ``text``; a bare ``::name`` that
    follows refers to the last file named."""
    found: list[tuple[str, str]] = []
    last = None
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)(?:\[[^\]]*\])?`", text):
        last = match.group(1) or last
        assert last, f"::{match.group(2)} names no file"
        found.append((last, match.group(2)))
    return found


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_document_names_exists(doc):
    named = _named_tests((ROOT / doc).read_text())
    missing = [f"{f}::{t}" for f, t in named if not (ROOT / f).is_file() or t not in _functions(ROOT / f)]
    assert not missing, missing


def test_reliability_names_tests():
    assert len(_named_tests((ROOT / "RELIABILITY.md").read_text())) >= 20


def test_a_wrong_test_name_is_caught():
    text = "`tests/search/test_loop.py::test_a_trial_killed_before_its_parameters_is_failed_not_retried`"
    (file, name), = _named_tests(text)
    assert name not in _functions(ROOT / file)


@pytest.mark.parametrize("doc", DOCS)
def test_every_script_a_document_runs_exists(doc):
    scripts = re.findall(r"\b((?:bench|scripts)/[\w./-]+\.(?:py|sh))\b", (ROOT / doc).read_text())
    assert [s for s in scripts if not (ROOT / s).is_file()] == []


@pytest.mark.parametrize("doc", DOCS)
def test_documents_speak_of_the_project_only(doc):
    text = (ROOT / doc).read_text()
    diary = re.findall(r"(?i)\b(?:session \d|sessions \d|issue #?\d+|goal \d|option \([a-z]\) of)", text)
    paths = re.findall(r"/tmp/[\w./-]+", text)
    assert not diary and not paths, diary + paths
