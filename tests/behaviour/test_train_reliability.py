"""The job under attack and accident (issue 12): planted checkpoints, twins, edited inputs, secrets, signals, bad files.

Each test runs the real job (tiny smoke cells, in-process where it can, as a CLI where the exit status and the
console are the point) and checks what lands on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.train import engine as eng
from distill.cell import fingerprints as inputs
from distill.cell.hashing import DigestCache
from distill.cell import lock as locks
from distill.cell.results import METRICS_FILE, read_metrics
from distill.files import atomic_write_json
from distill.train import run as train_mod
from distill.options import CellBusy, CheckpointError, ConfigError, InputError
from distill.cell.preemption import Interrupted
from distill.train.prepare import load_data_and_tokenizer
from distill.train.run import run_cell

FAST = ["eval.max_examples=2"]


def _log_records(cell: Path) -> list[dict]:
    return [json.loads(line) for line in (cell / "train_log.jsonl").read_text().splitlines()]


def _weights(cell: Path) -> dict[str, torch.Tensor]:
    return load_file(str(cell / "student" / "model.safetensors"))


def _env(**extra: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.train", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def _grep(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# ----------------------------------------------------------------------------------------------- preemption
def test_sigterm_checkpoints_at_the_step_boundary_and_the_resume_ends_like_an_unstopped_run(smoke_cfg, tmp_path,
                                                                                              monkeypatch):
    common = [*FAST, "trainer.max_steps=8", "trainer.log_every=3", "trainer.ckpt_every=100", "trainer.eval_every=0"]
    straight = run_cell(smoke_cfg(*common, f"paths.root={tmp_path}/straight"))

    real_step = train_mod.train_step

    def step_then_signal(cell, step, *a, **k):
        result = real_step(cell, step, *a, **k)
        if step == 6:  # SLURM's SIGTERM lands in the middle of the 7th step
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    cfg = smoke_cfg(*common, f"paths.root={tmp_path}/stopped")
    cell = inputs.locate(cfg)[0]
    monkeypatch.setattr(train_mod, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        run_cell(cfg)
    assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # handlers given back
    m = read_metrics(cell)
    assert m["status"] == "interrupted" and "SIGTERM at step 7" in m["error"]
    assert m["attempts"][0]["status"] == "interrupted" and m["attempts"][0]["end_step"] == 7
    assert (cell / eng.CKPT_DIR / "latest").read_text().strip() == "step00000007"  # the step it was in: nothing lost
    assert not (cell / locks.LOCK_FILE).exists()
    assert "stopped by SIGTERM at step 7; checkpoint saved" in (cell / "train.log").read_text()

    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == 7
    # The last log window spans the stop (steps 7 and 8): its running sum came back with the checkpoint.
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-12)
    for k, w in _weights(Path(straight["run_dir"])).items():
        torch.testing.assert_close(_weights(cell)[k], w, rtol=0, atol=0)
    assert [a["status"] for a in resumed["attempts"]] == ["interrupted", "completed"]
    assert [a["start_step"] for a in resumed["attempts"]] == [0, 7] and resumed["train"]["attempts"] == 2
    assert resumed["train"]["time_s"] > resumed["attempts"][1]["time_s"]  # total over both attempts


def test_a_killed_attempt_redoes_its_steps_once_and_reads_stale(smoke_cfg, tmp_path, monkeypatch):
    """Killed after step 5 (last checkpoint at 3, train log at 4): the log holds each step once after the resume;
    an attempt that died without a word (SIGKILL: status still running, a dead lock) reads stale."""
    cfg = smoke_cfg(*FAST)
    cell = inputs.locate(cfg)[0]
    real_step = train_mod.train_step

    def die_in_step_5(cell_, step, *a, **k):
        if step == 4:
            raise RuntimeError("node died")
        return real_step(cell_, step, *a, **k)

    monkeypatch.setattr(train_mod, "train_step", die_in_step_5)
    with pytest.raises(RuntimeError, match="node died"):
        run_cell(cfg)
    assert [r["step"] for r in _log_records(cell) if "train/loss" in r] == [2, 4]
    # Make it look SIGKILLed: nothing recorded (still "running") and its lock left behind by a dead process.
    m = read_metrics(cell)
    m["status"] = m["attempts"][-1]["status"] = "running"
    atomic_write_json(cell / METRICS_FILE, m)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = locks.Holder.me(30, 300)
    holder.pid = dead.pid
    (cell / locks.LOCK_FILE).write_text(holder.to_json())
    from distill.report.records import scan_sweep

    assert [c.status for c in scan_sweep(cell.parent)] == ["stale"]

    monkeypatch.setattr(train_mod, "train_step", real_step)
    resumed = run_cell(cfg)
    assert resumed["status"] == "completed" and resumed["train"]["resumed_from_step"] == 3
    records = _log_records(cell)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]  # step 4 was redone, logged once
    assert [r["step"] for r in records if "valid/ce" in r] == [3, 6]
    assert [a["status"] for a in resumed["attempts"]] == ["stale", "completed"]


# ----------------------------------------------------------------------------------------------- twins
def test_a_busy_cell_is_not_run_twice(smoke_cfg, tmp_path):
    cfg = smoke_cfg(*FAST, "cell_lock.wait_s=0")
    cell = inputs.locate(cfg)[0]
    other = locks.CellLock(cell, heartbeat_s=1, stale_after_s=30)  # another live run of the same cell
    other.acquire(wait_s=0)
    try:
        with pytest.raises(CellBusy, match=rf"{cell.name} is being run by host \S+ pid {os.getpid()}, heartbeat"):
            run_cell(cfg)
    finally:
        other.release()
    assert not (cell / METRICS_FILE).exists()  # nothing written by the refused twin


def test_a_waiting_twin_skips_the_cell_its_first_run_finished(smoke_cfg, tmp_path, monkeypatch):
    first = run_cell(smoke_cfg(*FAST))
    cell = Path(first["run_dir"])
    done = (cell / METRICS_FILE).read_text()
    atomic_write_json(cell / METRICS_FILE, {**first, "status": "running"})  # the first run is busy...
    other = locks.CellLock(cell, heartbeat_s=0.2, stale_after_s=30)
    other.acquire(wait_s=0)

    def finish_later():
        time.sleep(1.5)
        (cell / METRICS_FILE).write_text(done)  # ...then completes and lets go
        other.release()

    threading.Thread(target=finish_later).start()
    monkeypatch.setattr(eng, "initialize", lambda *a, **k: pytest.fail("the twin trained"))
    t0 = time.monotonic()
    assert run_cell(smoke_cfg(*FAST, "cell_lock.heartbeat_s=0.2")) == json.loads(done)
    assert time.monotonic() - t0 >= 1.0  # it waited for the first run


@pytest.mark.slow
def test_two_identical_commands_at_once_train_the_cell_once(smoke_cfg, tmp_path, data_root):
    # The test holds the cell's lock until both commands are waiting on it, so the race is the same on every
    # machine: had one command started after the other finished, it would only skip a completed cell.
    args = ["experiment=smoke", *FAST, f"paths.root={tmp_path}", f"paths.data_dir={data_root}",
            "cell_lock.heartbeat_s=1"]
    cell = inputs.locate(smoke_cfg(*FAST, "cell_lock.heartbeat_s=1"))[0]
    cell.mkdir(parents=True)
    early = locks.CellLock(cell, heartbeat_s=1, stale_after_s=30)
    early.acquire(wait_s=0)
    procs = [subprocess.Popen([sys.executable, "-m", "distill.train", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env()) for _ in range(2)]
    outs: list[list[str]] = [[], []]
    pumps = [threading.Thread(target=lambda p=p, o=o: o.extend(p.stdout)) for p, o in zip(procs, outs)]
    for t in pumps:
        t.start()
    try:
        deadline = time.monotonic() + 600
        while not all(any("waiting for it" in line for line in o) for o in outs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                "\n".join("".join(o)[-2000:] for o in outs)
            time.sleep(0.2)
    finally:
        early.release()  # now both race for the lock
    for p in procs:
        p.wait(timeout=900)
    for t in pumps:
        t.join()
    outs_text = ["".join(o) for o in outs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs_text)
    m = json.loads((cell / METRICS_FILE).read_text())
    assert m["status"] == "completed" and len(m["attempts"]) == 1  # one of them trained, once
    steps = [r["step"] for r in _log_records(cell) if "train/loss" in r]
    assert steps == sorted(set(steps)) == [2, 4, 6]
    assert sum("already completed" in o for o in outs_text) == 1  # the other waited for it, then skipped it


# ----------------------------------------------------------------------------------------------- checkpoints
def test_a_planted_checkpoint_pickle_never_runs_in_the_job(smoke_cfg, tmp_path, monkeypatch):
    from tests.train.test_engine import Payload

    cfg = smoke_cfg(*FAST)
    cell = inputs.locate(cfg)[0]
    real_save = eng.save_checkpoint

    def save_then_die(engine, run_dir, step, client_state, keep):
        real_save(engine, run_dir, step, client_state, keep)
        raise RuntimeError("preempted")

    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError):
        run_cell(cfg)
    monkeypatch.setattr(eng, "save_checkpoint", real_save)
    marker = tmp_path / "pwned"
    planted = cell / eng.CKPT_DIR / "step00000003" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, planted)

    with pytest.raises(CheckpointError) as err:
        run_cell(cfg)
    assert not marker.exists()
    assert "\n" not in str(err.value) and str(planted) in str(err.value)
    m = read_metrics(cell)
    assert m["status"] == "failed" and "weights-only" in m["error"]
    assert "Traceback" in (cell / "train.log").read_text()  # the traceback is kept in the cell's log
    # force=true starts the cell over (its checkpoints go) and never touches the payload
    assert run_cell(smoke_cfg(*FAST, "force=true"))["status"] == "completed" and not marker.exists()


# ----------------------------------------------------------------------------------------------- inputs
@pytest.fixture
def jsonl_cfg(smoke_cfg, tmp_path, data_root):
    """A smoke cell on a user's JSONL file (a copy of the embedded train split) with the embedded tokenizer."""
    from distill.data.embedded import prepare_embedded

    suite = prepare_embedded(smoke_cfg().data, data_root)
    train = tmp_path / "train.jsonl"
    train.write_text("".join((suite / "train.jsonl").read_text().splitlines(keepends=True)[:64]))

    def make(*extra: str):
        return smoke_cfg("data=dolly", "data.kind=jsonl", f"data.train_file={train}", "data.valid_size=8",
                         "data.test_size=8", f"model.tokenizer={suite / 'tokenizer'}", "data.max_length=96",
                         "data.max_prompt_length=64", "trainer.max_steps=2", *FAST, *extra)

    return make, train


def test_an_edited_data_file_makes_a_new_cell_or_one_line(jsonl_cfg, monkeypatch):
    make, train = jsonl_cfg
    first = run_cell(make())
    assert first["inputs"]["data.train_file"]["sha256"] == inputs.fingerprint_path(train, DigestCache(None))["sha256"]
    # An edit that keeps the size and puts the mtime back: only the content says it changed.
    st = train.stat()
    train.write_text(train.read_text().replace("a", "e", 1))
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))

    with pytest.raises(InputError, match=r"^inputs changed since .* ran: data.train_file: sha256 \w{12} .* -> sha256 "
                                         r"\w{12} .*Set inputs.on_change=rerun"):
        run_cell(make("inputs.on_change=error"))
    second = run_cell(make())
    assert second["status"] == "completed" and second["signature"] != first["signature"]
    assert second["config_signature"] == first["config_signature"] and second["run_dir"] != first["run_dir"]
    assert read_metrics(Path(first["run_dir"]))["status"] == "completed"  # the old result stays, superseded


BAD_ROWS = {
    "missing": None,
    "empty": b"\n\n",
    "malformed": b'{"instruction": "a", "output": "b"\n',
    "missing field": b'{"instruction": "a"}\n',
    "not utf-8": b'{"instruction": "caf\xe9", "output": "b"}\n',
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_data_file_is_one_line_and_leaves_nothing(case, jsonl_cfg, tmp_path):
    make, train = jsonl_cfg
    if BAD_ROWS[case] is None:
        train.unlink()
    else:
        train.write_bytes(BAD_ROWS[case] * (1 if case == "empty" else 20))
    with pytest.raises(InputError) as err:
        run_cell(make(f"paths.root={tmp_path}/out"))
    msg = str(err.value)
    assert "\n" not in msg and str(train) in msg
    if case not in ("missing", "empty"):
        assert f"{train}:1:" in msg  # file:line
    assert not (tmp_path / "out" / "adhoc").exists()  # nothing half-written


def test_vocab_mismatch_is_found_from_the_configs_before_any_weights_load(smoke_cfg, tmp_path, monkeypatch, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = tmp_path / "small_teacher"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(teacher)
    from distill import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("weights loaded before the vocab check"))
    with pytest.raises(InputError, match=r"^model=toy: teacher vocab \(100\) is smaller than student vocab \(\d+\)"):
        run_cell(smoke_cfg(*FAST, f"model.teacher.path={teacher}"))


def test_a_corrupt_safetensors_file_is_one_line(smoke_cfg, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = smoke_cfg()
    _, tok = load_data_and_tokenizer(cfg)
    teacher = tmp_path / "teacher"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok))).save_pretrained(teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match=rf"^model.teacher.path={teacher}: cannot load this model \(SafetensorError: "
                                         r".*\): re-export or re-download it"):
        run_cell(smoke_cfg(*FAST, f"model.teacher.path={teacher}"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write, root included (chattr +i; chmod for other users)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a read-only dir")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)


def test_a_read_only_output_root_is_one_line(smoke_cfg, read_only_dir, data_root):
    with pytest.raises(InputError, match=r"^cannot write the cell dir .*: point paths.root \(or DISTILL_OUTPUT\) at a "
                                         r"writable directory$"):
        run_cell(smoke_cfg(*FAST, f"paths.root={read_only_dir}", f"paths.data_dir={data_root}"))


def test_garbage_metrics_make_a_finished_cell_unfinished_and_force_gets_past(smoke_cfg, caplog):
    first = run_cell(smoke_cfg(*FAST))
    cell = Path(first["run_dir"])
    (cell / METRICS_FILE).write_bytes(b"\xff\xfe[1, 2")
    again = run_cell(smoke_cfg(*FAST))  # rerun (resume), no crash
    assert again["status"] == "completed" and "counts as unfinished" in caplog.text
    (cell / METRICS_FILE).write_text("[1, 2]")
    assert run_cell(smoke_cfg(*FAST, "force=true"))["status"] == "completed"


# ----------------------------------------------------------------------------------------------- CLI: one line
def test_cli_input_error_is_one_line_with_exit_2_and_nothing_written(tmp_path, data_root):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    proc = _cli("experiment=smoke", "data=dolly", "data.kind=jsonl", f"data.train_file={bad}", "data.valid_size=1",
                "data.test_size=1", f"paths.root={tmp_path}/out", f"paths.data_dir={data_root}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill-train:")]
    assert lines == [f"distill-train: input error: data=dolly: {bad}:2: not UTF-8 (byte 0xff at column 18): "
                     "re-encode the file as UTF-8"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override", ["+hf_token=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
                                      "+logger.api_key=s3cr3t-wandb-key-0123456789",
                                      "+data.note=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH"])
def test_a_secret_override_is_refused_and_lands_nowhere(override, tmp_path):
    secret = override.split("=", 1)[1]
    proc = _cli("experiment=smoke", f"paths.root={tmp_path}/out", "logger=wandb", override, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"distill-train: config error: {override.split('=')[0]} looks like a secret: pass secrets in the environment "
        "(HF_TOKEN, WANDB_API_KEY, ...), never as an override: overrides are written to disk and to W&B"]
    assert secret not in proc.stdout + proc.stderr.replace(override.split("=")[0], "")
    assert _grep(tmp_path, secret) == []


def test_a_secret_in_a_config_is_refused_before_anything_is_written(smoke_cfg, tmp_path):
    from omegaconf import open_dict

    cfg = smoke_cfg(*FAST)
    with open_dict(cfg):
        cfg.model.hub_token = "s3cr3t"
    with pytest.raises(ConfigError, match=r"^model.hub_token: looks like a secret: pass secrets in the environment"):
        run_cell(cfg)
    assert _grep(tmp_path, "s3cr3t") == []


def test_hydra_writes_nothing_of_its_own_and_the_cell_log_is_in_the_cell(tmp_path, data_root):
    proc = _cli("experiment=smoke", *FAST, f"paths.root={tmp_path}", f"paths.data_dir={data_root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cell,) = (tmp_path / "adhoc").iterdir()
    assert sorted(p.name for p in (tmp_path / "adhoc").rglob("*") if p.name.startswith(".")) == []  # no .hydra*
    log = (cell / "train.log").read_text()
    assert "step 6/6 loss" in log and "step 6/6 loss" not in proc.stdout + proc.stderr  # loss lines: cell log only


def test_truncation_side_changes_what_the_model_sees(smoke_cfg, tmp_path):
    """Prompts longer than max_prompt_length keep their end (left) or their start (right): the two cells see
    other tokens from the first step on (generation truncates the same way: test_evaluate.py)."""
    common = [*FAST, "data.max_prompt_length=24", "trainer.max_steps=2", "trainer.log_every=1"]
    left = run_cell(smoke_cfg(*common, "data.truncation_side=left", f"paths.root={tmp_path}/l"))
    right = run_cell(smoke_cfg(*common, "data.truncation_side=right", f"paths.root={tmp_path}/r"))
    assert left["signature"] != right["signature"]
    first = [_log_records(Path(m["run_dir"]))[0]["train/loss"] for m in (left, right)]
    assert first[0] != first[1]  # the same init, other tokens: another first-step loss
