"""One line instead of a traceback, end to end: settings that cannot train, a full disk under a result
file, a checkpoint or the export, a pickle-only checkpoint dir.

Each test runs the real job (tiny smoke cells, in-process where the cell's record is the point, as the CLI where
the exit status and the console are) and checks what lands on disk: status `failed` with one line, nothing
half-written, and a rerun that picks up where the cell stood.
"""

from __future__ import annotations

import argparse
import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from transformers.modeling_utils import PreTrainedModel

from distill import files
from distill.cell import fingerprints as inputs
from distill.cell.results import read_metrics
from distill.config import compose
from distill.options import CheckpointError, OutputError
from distill.train import engine as eng
from distill.train.run import run_cell
from tests.behaviour.test_train_reliability import FAST, _cli, _env

NO_SPACE = "no space left on the device (ENOSPC): free space there"


def _half_then_full(target: str, when: bytes = b""):
    """`files.atomic_write_bytes` on a disk that fills up while writing the file named `target` (holding `when`):
    half the file lands in the temp, then ENOSPC."""
    real = files.atomic_write_bytes

    def write(path: Path, data: bytes) -> None:
        if Path(path).name == target and when in data:
            with files.atomic_path(Path(path)) as tmp:
                tmp.write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    return write


def _temps(cell: Path) -> list[Path]:
    """What an atomic write left behind (it must leave nothing)."""
    return [p for p in cell.rglob(".*") if files.TEMP_PART.search(p.name)]


def _failed_in_one_line(cell: Path, starts: str) -> dict:
    m = read_metrics(cell)
    assert m["status"] == "failed" and "\n" not in m["error"] and m["error"].startswith(starts), m.get("error")
    assert not _temps(cell), _temps(cell)
    return m


# ------------------------------------------------------------------------------- a full disk (catalogue 2)
@pytest.mark.parametrize(("target", "when", "named"), [
    ("metrics.json", b'"status": "completed"', "metrics.json"),   # the result itself, as the cell completes
    ("test.generations.jsonl", b"", "generations/test.generations.jsonl"),  # inside the generations dir's temp
])
def test_a_full_disk_under_a_result_file_fails_the_cell_in_one_line(smoke_cfg, monkeypatch, target, when, named):
    cfg = smoke_cfg(*FAST)
    cell = inputs.locate(cfg)[0]
    monkeypatch.setattr(files, "atomic_write_bytes", _half_then_full(target, when))
    with pytest.raises(OutputError):
        run_cell(cfg)
    _failed_in_one_line(cell, f"OutputError: cannot write {cell / named}: {NO_SPACE}")
    assert not (cell / "generations" / "test.generations.jsonl").exists() or target == "metrics.json"
    monkeypatch.undo()
    assert run_cell(cfg)["status"] == "completed"  # space freed: the rerun finishes the cell


def test_a_full_disk_at_a_checkpoint_keeps_the_last_complete_one(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(*FAST, "trainer.max_steps=8", "trainer.ckpt_every=3")   # checkpoints at steps 3 and 6
    cell = inputs.locate(cfg)[0]
    real = TorchCheckpointEngine.save

    def save(self, state_dict, path: str) -> None:
        if "step00000006" in path:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", save)
    with pytest.raises(OutputError):
        run_cell(cfg)
    ckpt = cell / eng.CKPT_DIR
    m = _failed_in_one_line(cell, f"OutputError: cannot write {ckpt / 'step00000006'}: {NO_SPACE}")
    assert "paths.root" in m["error"] and m["attempts"][-1]["end_step"] == 6
    assert (ckpt / "latest").read_text() == "step00000003" and not (ckpt / "step00000006").exists()
    monkeypatch.undo()
    resumed = run_cell(cfg)
    assert resumed["status"] == "completed" and resumed["train"]["resumed_from_step"] == 3


def test_a_full_disk_at_the_export_leaves_no_half_student(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(*FAST)
    cell = inputs.locate(cfg)[0]
    real = PreTrainedModel.save_pretrained

    def save_pretrained(self, directory, *args, **kwargs):
        if Path(directory).name.startswith(".student."):
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "model.safetensors").write_bytes(b"half a model")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    with pytest.raises(OutputError):
        run_cell(cfg)
    _failed_in_one_line(cell, f"OutputError: cannot write {cell / 'student'}: {NO_SPACE}")
    assert not (cell / "student").exists()
    monkeypatch.undo()
    assert run_cell(cfg)["status"] == "completed"


def _cli_patched(patch: str, *args: str) -> subprocess.CompletedProcess:
    """`distill-train args` in a child whose `patch` (Python source) runs first."""
    code = f"import sys\n{patch}\nfrom distill.train.cli import main\nsys.argv = ['distill-train', *{list(args)!r}]\nmain()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)


def _one_line(proc: subprocess.CompletedProcess, starts: str) -> str:
    """The child's one `distill-train:` line (exit 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill-train:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(starts), proc.stderr[-3000:]
    return lines[0]


FULL_AT_THE_RESULT = """
import errno
from pathlib import Path
from distill import files
real = files.atomic_write_bytes
def write(path, data):
    if Path(path).name == "metrics.json" and b'"status": "completed"' in data:
        with files.atomic_path(Path(path)) as tmp:
            tmp.write_bytes(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
    real(path, data)
files.atomic_write_bytes = write
"""


def test_distill_train_on_a_full_disk_is_one_line_and_exit_2(tmp_path, data_root):
    args = ["experiment=smoke", f"paths.root={tmp_path}", f"paths.data_dir={data_root}", *FAST]
    cell = inputs.locate(compose(args))[0]
    msg = _one_line(_cli_patched(FULL_AT_THE_RESULT, *args), "distill-train: output error: cannot write ")
    assert msg == f"distill-train: output error: {read_metrics(cell)['error'].removeprefix('OutputError: ')}"
    assert f"{cell / 'metrics.json'}: {NO_SPACE}" in msg and "paths.root" in msg
    _failed_in_one_line(cell, "OutputError: ")


# ------------------------------------------------------------------------------- a pickle-only checkpoint (3)
def test_a_pickle_only_checkpoint_dir_is_one_line_that_never_suggests_an_unsafe_load(tmp_path, data_root, monkeypatch):
    args = ["experiment=smoke", f"paths.root={tmp_path}", f"paths.data_dir={data_root}", *FAST]
    cfg = compose(args)
    cell = inputs.locate(cfg)[0]
    real_save = eng.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise RuntimeError("preempted")

    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError):
        run_cell(cfg)
    monkeypatch.undo()
    tag = cell / eng.CKPT_DIR / "step00000003"
    for f in sorted(tag.glob("*.pt")):  # what another trainer leaves: its args pickled beside the tensors
        torch.save({**torch.load(f, weights_only=False), "args": argparse.Namespace(lr=1e-3)}, f)
        torch.load(f, weights_only=False)  # pickle-only: it loads, but only the unsafe way
        with pytest.raises(CheckpointError):
            eng.safe_load(f)

    msg = _one_line(_cli(*args), "distill-train: input error: ")
    assert "not a weights-only checkpoint written by distill" in msg and "argparse.Namespace" in msg
    assert f"delete {cell / eng.CKPT_DIR}" in msg and "force=true" in msg
    for text in (msg, (cell / "train.log").read_text(), (cell / "metrics.json").read_text()):
        assert "weights_only" not in text and "can still be loaded" not in text
    assert read_metrics(cell)["status"] == "failed"


# ------------------------------------------------------------------------------- settings that cannot train (1, 5)
@pytest.mark.parametrize("overrides", [
    ["trainer.log_every=0"],
    ["trainer.lr=nan"],
    ["trainer.lr=0"],
    ["eval.temperature=0"],
    ["data.max_prompt_length=100"],                                   # smoke: data.max_length=96
    ["tau=1e9"],
    ["divergence=skl", "divergence.alpha=0.999999999"],
    ["eval.batch_size=0"],
    ["eval.seeds=[1.5]"],
])
def test_a_setting_that_cannot_train_is_one_config_error_line_and_creates_nothing(tmp_path, overrides):
    out = tmp_path / "out"
    proc = _cli("experiment=smoke", f"paths.root={out}", *overrides, timeout=300)
    key = overrides[-1].split("=", 1)[0]
    msg = _one_line(proc, "distill-train: config error: ")
    assert key in msg or overrides[0].split("=", 1)[0] in msg
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [msg]
    assert not out.exists()  # refused before any work: no cell dir, no data, nothing
