"""Reliability: secrets reach no file, W&B never prompts or hangs, names cannot leave the output root.

Each test runs the real `distill-train` (a subprocess) or the real W&B client. W&B "unreachable" is a closed port on
127.0.0.1 (nothing listens on port 9 here): the client fails to connect, as it would without a network.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.behaviour.test_train_reliability import FAST, _env, _grep

SECRET = "s3cr3t-value-0123456789abcdef"


def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.train", *args], capture_output=True, text=True,
                          env={**_env(), **(env or {})}, timeout=timeout)


def test_a_secret_read_from_the_environment_reaches_no_file(tmp_path, data_root):
    """`+data.note=${oc.env:DISTILL_TEST_TOKEN}`: allowed on the command line (only the variable's name is there),
    but its value is written nowhere: not config.yaml, not the W&B run files, not their logs."""
    proc = _run("experiment=smoke", *FAST, f"paths.root={tmp_path}", f"paths.data_dir={data_root}", "logger=wandb",
                "logger.mode=offline", "+data.note=${oc.env:DISTILL_TEST_TOKEN}", env={"DISTILL_TEST_TOKEN": SECRET})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [config] = list(tmp_path.rglob("config.yaml"))
    assert "note" not in config.read_text()          # the key whose value came from a secret variable is dropped
    assert list(tmp_path.rglob("*.wandb"))           # W&B wrote its run...
    assert _grep(tmp_path, SECRET) == []             # ...and nothing anywhere holds the secret


def test_one_sweep_choice_that_is_a_secret_is_refused_before_hydra_writes_multirun_yaml(tmp_path):
    token = "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"
    proc = _run("-m", "experiment=smoke", f"paths.root={tmp_path}", f"+data.note=plain,{token}", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("distill-train: config error: +data.note looks like a secret")
    assert not list(tmp_path.rglob("multirun.yaml")) and _grep(tmp_path, token) == []


def test_a_secret_in_a_config_file_of_a_multirun_is_refused_before_hydra_writes_multirun_yaml(tmp_path):
    extra = tmp_path / "conf" / "experiment"
    extra.mkdir(parents=True)
    (extra / "leaky.yaml").write_text(f"# @package _global_\nlogger:\n  api_key: {SECRET}\n")
    proc = _run("-m", "experiment=smoke,leaky", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                f"paths.root={tmp_path}/out", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "distill-train: config error: logger.api_key looks like a secret: pass secrets in the environment "
        "(HF_TOKEN, WANDB_API_KEY, ...), never as a config: configs are written to disk and to W&B"]
    assert not (tmp_path / "out").exists()


def test_wandb_online_without_a_key_is_one_line_before_the_lock(tmp_path):
    """At a terminal W&B would wait at its login prompt, holding the cell's lock: refuse up front instead."""
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path / "home"), "WANDB_API_KEY": ""}
    proc = _run("experiment=smoke", f"paths.root={tmp_path}/out", "logger=wandb", env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distill-train: config error: logger.mode=online (WANDB_MODE) needs a W&B API key: set WANDB_API_KEY or "
        "run `wandb login`, or use logger.mode=offline and upload later with `wandb sync`"]
    assert not (tmp_path / "out").exists()


UNREACHABLE = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
from distill.tracking.wandb_run import Tracker
cfg = {"name": "wandb", "project": "p", "mode": "online", "init_timeout_s": 3, "dir": sys.argv[1]}
tracker = Tracker(cfg, run_id="unreachable-run", name="n", group="g", tags=[], config={"tau": 1.0},
                  run_dir=sys.argv[1] + "/cell")
tracker.log({"train/loss": 1.0}, step=1)
tracker.finish(0)
print("finished")
"""


def test_wandb_unreachable_logs_offline_within_its_timeout(tmp_path):
    """In a process of its own: W&B keeps its login (key, base URL) in process-wide state."""
    env = {**_env(), "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}   # a closed local port
    env.pop("WANDB_MODE")
    proc = subprocess.run([sys.executable, "-c", UNREACHABLE, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "could not be reached within 3 s" in proc.stdout and "logs offline" in proc.stdout
    assert proc.stdout.strip().endswith("finished")
    assert list((tmp_path / "wandb").glob("offline-run-*-unreachable-run/run-unreachable-run.wandb"))


@pytest.mark.parametrize("key, name", [("sweep_name", "../elsewhere"), ("sweep_name", "a/b"), ("sweep_name", "cost$1"),
                                       ("sweep_name", "two words"), ("sweep_name", ".hidden"),
                                       ("model.student.name", "org/model")])
def test_a_name_that_is_not_one_plain_path_part_is_refused(tmp_path, key, name):
    """Sweep and model names become directories: `..` would leave the output root, `/` would nest dirs where the
    report does not look, `$` broke the report's PNG and HTML."""
    proc = _run("experiment=smoke", f"paths.root={tmp_path}/out", f"{key}={name}", timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distill-train: config error: {key}={name!r}: a name becomes a directory under paths.root: use "
        "letters, digits and . _ + - only, starting with a letter or digit (no '/', '..', spaces or '$')"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()
