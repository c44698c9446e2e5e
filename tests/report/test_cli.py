"""distill.report.cli: `distill-report` and `distill-dashboard`, their errors one line each."""

import subprocess
import sys
from pathlib import Path

import pytest

from distill.report import cli as report_cli
from distill.report import wandb as wandb_report
from tests.report.sweeps import fixture_sweep


def test_cli_writes_report(sweep, capsys):
    assert report_cli.main([str(sweep)]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (sweep / "report.md").exists()


@pytest.mark.parametrize("make", ["missing", "empty", "hidden-only"])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, make):
    target = tmp_path / "sweep"
    if make != "missing":
        target.mkdir()
    if make == "hidden-only":
        (target / ".hydra-jobs" / "0").mkdir(parents=True)
        (target / "data").mkdir()  # not named like a cell, no metrics.json
    assert report_cli.main([str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distill-report: error:") and str(target) in err


def test_console_script_exit_code(tmp_path):
    exe = Path(sys.executable).parent / "distill-report"
    proc = subprocess.run([str(exe), str(tmp_path / "nope")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("distill-report: error:") and len(proc.stderr.strip().splitlines()) == 1


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        report_cli.main(["somewhere", "--group", "g"])
    assert e.value.code == 2
    assert report_cli.main(["somewhere", "--wandb", "no-slash"]) == 1
    assert "ENTITY/PROJECT" in capsys.readouterr().err


def test_cli_html_rebuilds_the_page(sweep_with_refs, capsys):
    assert report_cli.dashboard(["html", str(sweep_with_refs)]) == 0
    assert (sweep_with_refs / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert report_cli.dashboard(["html", str(sweep_with_refs / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_online_without_a_login_writes_the_spec_instead_of_failing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))          # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    sweep = fixture_sweep(tmp_path)
    assert report_cli.dashboard(["wandb", str(sweep), "--project", "p", "--no-summary-run"]) == 0
    assert "not publishing" in capsys.readouterr().err and (sweep / wandb_report.SPEC_FILE).is_file()
