"""Fixtures of the report tests: a copy of the fixture sweep (with its reference models: `sweep_with_refs`),
and the constructed sweep with its report."""

import shutil

import pytest

from distill.report.write import build_report
from tests.report.sweeps import FIXTURE, constructed_sweep, fixture_sweep, read_csv


@pytest.fixture
def sweep(tmp_path):
    dst = tmp_path / "fixture-sweep"
    shutil.copytree(FIXTURE, dst)
    return dst


@pytest.fixture
def sweep_with_refs(tmp_path):
    """The fixture sweep whose cells name the prep teacher and warm start as their models."""
    return fixture_sweep(tmp_path)


@pytest.fixture
def constructed(tmp_path):
    """The constructed sweep's scores, its report.csv rows and its report.md."""
    scores = constructed_sweep(tmp_path)
    build_report(tmp_path)
    return scores, read_csv(tmp_path / "report.csv"), (tmp_path / "report.md").read_text()
