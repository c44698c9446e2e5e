"""distill/train/engine.py: checkpoints load weights-only at every ZeRO stage; planted or corrupt files are refused; the
learning-rate schedule (transformers' warmup + cosine) equals the hand-written one it replaced, step by step."""

from __future__ import annotations

import errno
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.options import CheckpointError, OutputError
from distill.train import engine as eng
from distill.train.engine import lr_schedule

CONF = Path(__file__).resolve().parents[2] / "conf"


class Payload:
    """What an attacker plants: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _engine(stage: int, precision: str = "fp32"):
    from transformers import AutoModelForCausalLM, GPT2Config

    eng.setup_distributed(60)
    trainer = OmegaConf.load(CONF / "trainer" / "cpu.yaml")
    trainer.update(zero_stage=stage, precision=precision, max_steps=4, micro_batch_size=2, warmup_steps=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, resid_pdrop=0.0,
                                                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    return eng.initialize(model, trainer, 1)


def _step(engine, seed: int) -> float:
    x = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(seed))
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "fp32")])
def test_resume_through_the_weights_only_loader_equals_going_on(stage, precision, tmp_path):
    a = _engine(stage, precision)
    _step(a, 0)
    eng.save_checkpoint(a, tmp_path, 1, {"step": 1, "torch_rng": torch.get_rng_state()}, keep=1)
    going_on = [_step(a, s) for s in (1, 2)]
    b = _engine(stage, precision)
    assert isinstance(b.checkpoint_engine, eng.WeightsOnlyCheckpointEngine)
    state = eng.load_latest_checkpoint(b, tmp_path)
    assert state["step"] == 1 and isinstance(state["torch_rng"], torch.Tensor)
    assert [_step(b, s) for s in (1, 2)] == going_on  # optimizer, schedule and weights all came back


@pytest.fixture
def saved(tmp_path) -> Path:
    """A genuine ZeRO-1 checkpoint (model states + optimizer shard) in `<tmp>/checkpoints/step00000001`."""
    engine = _engine(1)
    _step(engine, 0)
    eng.save_checkpoint(engine, tmp_path, 1, {"step": 1}, keep=1)
    return tmp_path


@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_planted_pickle_never_runs(saved, target, tmp_path):
    marker = tmp_path / "pwned"
    path = saved / eng.CKPT_DIR / "step00000001" / target
    assert path.exists()
    torch.save({"module": Payload(marker)}, path)
    # The threat is real: DeepSpeed's own loader (weights_only=False) would run it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as err:
        eng.load_latest_checkpoint(_engine(1), saved)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "weights-only" in msg and "force=true" in msg
    # The engine's own loader refuses it too, whoever calls it.
    with pytest.raises(CheckpointError):
        _engine(1).checkpoint_engine.load(str(path))
    assert not marker.exists()


def test_latest_must_name_a_checkpoint_of_ours(saved):
    (saved / eng.CKPT_DIR / "latest").write_text("../../../etc")
    with pytest.raises(CheckpointError, match=r"names '../../../etc', not a checkpoint written here"):
        eng.load_latest_checkpoint(_engine(1), saved)


def test_a_truncated_checkpoint_file_is_one_line(saved):
    path = saved / eng.CKPT_DIR / "step00000001" / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError) as err:
        eng.load_latest_checkpoint(_engine(1), saved)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def _pickle_only(path: Path, how: str) -> None:
    """Rewrite a genuine checkpoint file so that only an unsafe load (weights_only=False) reads it back."""
    import argparse

    import numpy as np

    obj = torch.load(path, weights_only=False)
    if how == "a foreign object":  # e.g. another trainer's torch.save(..., args)
        torch.save({**obj, "args": argparse.Namespace(lr=1e-3)}, path)
    elif how == "numpy arrays":
        torch.save({**obj, "rng": np.random.get_state()}, path)
    elif how == "a legacy torch.save":
        torch.save({**obj, "args": argparse.Namespace(lr=1e-3)}, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle
        path.write_bytes(pickle.dumps({"args": argparse.Namespace(lr=1e-3)}))


@pytest.mark.parametrize("how", ["a foreign object", "numpy arrays", "a legacy torch.save", "a plain pickle"])
def test_a_pickle_only_checkpoint_dir_is_one_line_that_never_suggests_weights_only_false(saved, how):
    ckpt_dir = saved / eng.CKPT_DIR
    files = sorted((ckpt_dir / "step00000001").glob("*.pt"))
    assert len(files) == 2
    for f in files:
        _pickle_only(f, how)
        with pytest.raises(Exception) as torch_says:  # what torch itself answers: load it unsafely
            torch.load(f, weights_only=True)
        assert "weights_only" in str(torch_says.value) or "zip" in str(torch_says.value)
        if how != "a plain pickle":  # torch.load reads no bare pickle at all
            torch.load(f, weights_only=False)  # a pickle-only file: it does load that way
    with pytest.raises(CheckpointError) as err:
        eng.load_latest_checkpoint(_engine(1), saved)
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg and msg.startswith(str(files[0]))
    assert "not a weights-only checkpoint written by distill" in msg
    assert f"delete {ckpt_dir}" in msg and "force=true" in msg
    assert "weights_only" not in msg and "can still be loaded" not in msg
    # torch's advice stays out of the cell's log too: the traceback has no chained cause
    for e in (err.value, pytest.raises(CheckpointError, eng.check_checkpoint, ckpt_dir).value):
        assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


def test_a_latest_that_cannot_be_read_is_one_line(saved):
    latest = saved / eng.CKPT_DIR / "latest"
    latest.unlink()
    latest.mkdir()
    with pytest.raises(CheckpointError) as err:
        eng.load_latest_checkpoint(_engine(1), saved)
    assert "\n" not in str(err.value) and "cannot be read" in str(err.value) and "force=true" in str(err.value)


# ----------------------------------------------------------------------------- a full disk
def _full_disk(code: int):
    """A writer that writes half of its file, then fails as a full (or read-only) disk does."""
    def write(state_dict, path: str) -> None:  # TorchCheckpointEngine.save's own signature (called by keyword)
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize(("code", "todo"), [(errno.ENOSPC, "free space there"), (errno.EDQUOT, "free space there"),
                                            (errno.EROFS, "make it writable"), (errno.EACCES, "make it writable")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_last_complete_one_stays(saved, code, todo, monkeypatch):
    engine = _engine(1)
    _step(engine, 0)
    monkeypatch.setattr(engine.checkpoint_engine._inner, "save", _full_disk(code))
    with pytest.raises(OutputError) as err:
        eng.save_checkpoint(engine, saved, 2, {"step": 2}, keep=1)
    msg, tag = str(err.value), saved / eng.CKPT_DIR / "step00000002"
    assert "\n" not in msg and msg.startswith(f"cannot write {tag}: ") and errno.errorcode[code] in msg
    assert todo in msg and "paths.root" in msg
    assert isinstance(err.value, OSError) and err.value.errno == code  # code that tolerates a failed write still does
    # Nothing half-written: the partial tag dir is gone, `latest` names the last complete checkpoint, which loads.
    assert not tag.exists() and (saved / eng.CKPT_DIR / "latest").read_text() == "step00000001"
    monkeypatch.undo()
    assert eng.load_latest_checkpoint(_engine(1), saved)["step"] == 1


@pytest.mark.parametrize("free_bytes", [40960, 10 * 2**30])
def test_torchs_own_full_disk_error_is_one_line_when_the_disk_is_full(saved, free_bytes, monkeypatch):
    """torch.save meets ENOSPC as a RuntimeError from its zip writer, errno-less: judged by the space left."""
    engine = _engine(1)

    def save(state_dict, path: str) -> None:
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        # what torch.save raised writing to /dev/full (a full disk) here, verbatim
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    class Fs:
        f_bavail, f_frsize = free_bytes // 4096, 4096

    monkeypatch.setattr(engine.checkpoint_engine._inner, "save", save)
    monkeypatch.setattr(eng.os, "statvfs", lambda _path: Fs())
    with pytest.raises((OutputError, RuntimeError)) as err:
        eng.save_checkpoint(engine, saved, 2, {"step": 2}, keep=1)
    full = free_bytes < 2**20
    assert isinstance(err.value, OutputError) == full and ("inline_container" in str(err.value)) != full
    if full:
        assert str(err.value).startswith(f"cannot write {saved / eng.CKPT_DIR / 'step00000002'}: no space left")
    assert not (saved / eng.CKPT_DIR / "step00000002").exists()  # never half a checkpoint, whatever the error


def test_a_failed_save_over_the_latest_checkpoint_leaves_no_latest(saved, monkeypatch):
    engine = _engine(1)
    monkeypatch.setattr(engine.checkpoint_engine._inner, "save", _full_disk(errno.ENOSPC))
    with pytest.raises(OutputError):
        eng.save_checkpoint(engine, saved, 1, {"step": 1}, keep=1)  # the same step: its files were being replaced
    assert not (saved / eng.CKPT_DIR / "step00000001").exists() and not (saved / eng.CKPT_DIR / "latest").exists()
    assert eng.load_latest_checkpoint(_engine(1), saved) is None  # the cell starts over, never from half a save


def test_save_checkpoint_writes_latest_itself_and_prunes(saved):
    engine = _engine(1)
    eng.save_checkpoint(engine, saved, 2, {"step": 2}, keep=1)
    ckpt = saved / eng.CKPT_DIR
    assert (ckpt / "latest").read_text() == "step00000002"
    assert [p.name for p in ckpt.glob("step*")] == ["step00000002"] and not list(ckpt.glob(".*.tmp"))


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_no_half_model(tmp_path, tiny_tokenizer, monkeypatch):
    engine = _engine(0)
    out = tmp_path / "student"

    def half_then_full(directory, *args, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.module, "save_pretrained", half_then_full)
    with pytest.raises(OutputError) as err:
        eng.export_hf(engine, tiny_tokenizer, out, 0)
    assert str(err.value).startswith(f"cannot write {out}: no space left on the device (ENOSPC): free space there")
    assert list(tmp_path.iterdir()) == []  # neither the student dir nor its temp


# ----------------------------------------------------------------------------- learning-rate schedule


def hand_written_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The schedule the job used before it took transformers' own, verbatim."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lrs(warmup: int, steps: int, min_ratio: float, peak: float = 1e-3) -> list[float]:
    """The learning rate each optimizer step trains with (LambdaLR is stepped after every step, as DeepSpeed does)."""
    opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=peak)
    sched = lr_schedule(opt, warmup, steps, min_ratio)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, steps, min_ratio", [
    (20, 300, 0.1),   # trainer=cpu
    (100, 300, 0.1),  # trainer=gpu's warmup
    (10, 150, 0.1),   # experiment=demo
    (40, 800, 0.1),   # recipe=demo/teacher
    (20, 300, 0.1),   # recipe=demo/student
    (1, 6, 0.1),      # experiment=smoke
    (0, 50, 0.0),     # no warmup, decay to zero
    (5, 5, 0.3),      # warmup as long as training
    (7, 33, 0.25),
])
def test_schedule_equals_the_hand_written_curve_at_every_step(warmup, steps, min_ratio):
    peak = 1e-3
    expected = [peak * hand_written_factor(s, warmup, steps, min_ratio) for s in range(steps + 1)]
    got = lrs(warmup, steps, min_ratio, peak)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    if warmup:
        assert got[0] == pytest.approx(peak / warmup) and got[warmup - 1] == pytest.approx(peak)  # no step at lr 0
    if steps > warmup:
        assert got[steps] == pytest.approx(peak * min_ratio, rel=1e-12)  # decayed to the floor at the end


def test_the_demo_schedules_are_bit_identical():
    # The demo's results must not move: equal floats, not just close ones, for the configs it trains with.
    for warmup, steps in ((10, 150), (40, 800), (20, 300), (1, 6)):
        assert lrs(warmup, steps, 0.1) == [1e-3 * hand_written_factor(s, warmup, steps, 0.1) for s in range(steps + 1)]


def test_schedule_state_survives_a_checkpoint():
    opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0)
    sched = lr_schedule(opt, 3, 10, 0.1)
    for _ in range(4):
        opt.step()
        sched.step()
    state = pickle.loads(pickle.dumps(sched.state_dict()))
    opt2 = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0)
    resumed = lr_schedule(opt2, 3, 10, 0.1)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == sched.get_last_lr()


def _listening_socket(port: int = 0):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def _port_is_free(port: int) -> bool:
    try:
        _listening_socket(port).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("launcher", ["inherited MASTER_PORT", "submitit job of one task"])
def test_a_one_process_job_starts_when_the_port_it_would_have_used_is_taken(launcher):
    # CI failed with EADDRINUSE: a SLURM array task of one process listened on the port submitit derives from
    # its job id, which another process held. One process needs no agreed port: the OS picks it at bind time.
    import random
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    if launcher == "inherited MASTER_PORT":
        taken = _listening_socket()
        env["MASTER_PORT"] = str(taken.getsockname()[1])
    else:
        def submitit_port(job_id: str) -> int:  # how submitit derives a job's port when MASTER_PORT is unset
            return random.Random(job_id).randint(20000, 60000)

        job_id = next(j for j in (str(random.randrange(10**6)) for _ in range(100)) if _port_is_free(submitit_port(j)))
        taken = _listening_socket(submitit_port(job_id))
        env.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID=job_id, SUBMITIT_LOCAL_NTASKS="1",
                   SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID="0",
                   SUBMITIT_LOCAL_LOCALID="0")
    with taken:
        child = subprocess.run([sys.executable, "-c", "from distill.train import engine; print(engine.setup_distributed(30))"],
                               capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0 and "(0, 1)" in child.stdout, child.stderr[-2000:]


def test_a_job_started_after_in_process_ones_gets_its_own_rendezvous_port():
    # The tests above initialised torch.distributed in this process; its TCPStore holds MASTER_PORT for the
    # rest of the session. conftest forgets the exported variables after each test, so a child job (a
    # pipeline stage, a SLURM job inheriting pytest's environment) picks a free port instead of that one.
    import subprocess
    import sys

    assert not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
    child = subprocess.run([sys.executable, "-c", "from distill.train import engine; print(engine.setup_distributed(30))"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0 and "(0, 1)" in child.stdout, child.stderr[-2000:]
