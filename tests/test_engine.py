"""distill/engine.py: checkpoints load weights-only at every ZeRO stage; planted or corrupt files are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill import engine as eng

CONF = Path(__file__).resolve().parents[1] / "conf"


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

    with pytest.raises(eng.CheckpointError) as err:
        eng.load_latest_checkpoint(_engine(1), saved)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "weights-only" in msg and "force=true" in msg
    # The engine's own loader refuses it too, whoever calls it.
    with pytest.raises(eng.CheckpointError):
        _engine(1).checkpoint_engine.load(str(path))
    assert not marker.exists()


def test_latest_must_name_a_checkpoint_of_ours(saved):
    (saved / eng.CKPT_DIR / "latest").write_text("../../../etc")
    with pytest.raises(eng.CheckpointError, match=r"names '../../../etc', not a checkpoint written here"):
        eng.load_latest_checkpoint(_engine(1), saved)


def test_a_truncated_checkpoint_file_is_one_line(saved):
    path = saved / eng.CKPT_DIR / "step00000001" / "mp_rank_00_model_states.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(eng.CheckpointError) as err:
        eng.load_latest_checkpoint(_engine(1), saved)
    assert "\n" not in str(err.value) and str(path) in str(err.value)



def test_a_job_started_after_in_process_ones_gets_its_own_rendezvous_port():
    # The tests above initialised torch.distributed in this process; its TCPStore holds MASTER_PORT for the
    # rest of the session. conftest forgets the exported variables after each test, so a child job (a
    # pipeline stage, a SLURM job inheriting pytest's environment) picks a free port instead of that one.
    import subprocess
    import sys

    assert not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_PORT"))
    child = subprocess.run([sys.executable, "-c", "from distill import engine; print(engine.setup_distributed(30))"],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0 and "(0, 1)" in child.stdout, child.stderr[-2000:]
