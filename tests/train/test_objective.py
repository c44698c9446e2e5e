"""The loss of a micro-batch (distill/train/objective.py): cached, chunked and fused cells train like the plain
one; the fused loss at ZeRO-3 equals ZeRO-0; a teacher sharded across two ranks equals its full copy."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import models
from distill.data import encoding
from distill.data.encoding import response_mask
from distill.train import engine as eng
from distill.train.objective import fused_batch_loss
from distill.train.prepare import load_data_and_tokenizer
from distill.train.run import run_cell
from tests.conftest import compose
from tests.train.conftest import child_env, weights


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, data_root):
    """A teacher dir made by the job itself (SFT, a few steps): what distillation cells load."""
    root = tmp_path_factory.mktemp("teacher")
    m = run_cell(compose(["experiment=[smoke,teacher]", f"paths.root={root}", f"paths.data_dir={data_root}",
                          "eval.max_examples=2"]))
    return Path(m["run_dir"]) / "student"


@pytest.fixture(scope="module")
def plain_cell(tmp_path_factory, data_root, trained_teacher):
    """The reference: live teacher, plain loss, ZeRO-0."""
    root = tmp_path_factory.mktemp("plain")
    return run_cell(compose(["experiment=smoke", f"paths.root={root}", f"paths.data_dir={data_root}",
                             *_DISTILL_COMMON, f"model.teacher.path={trained_teacher}", "loss.teacher_cache=false"]))


_DISTILL_COMMON = ["divergence=jsd", "tau=2", "eval.max_examples=2"]


@pytest.mark.parametrize("extra", [["loss.teacher_cache=hidden"], ["loss.teacher_cache=logits"],
                                   ["loss.impl=chunked", "loss.chunk_size=7"],
                                   ["loss.impl=fused", "loss.chunk_size=7"],
                                   ["loss.impl=fused", "loss.teacher_cache=auto", "trainer.zero_stage=3"]])
def test_cached_chunked_and_fused_cells_train_like_the_plain_one(extra, smoke_cfg, tmp_path, trained_teacher,
                                                                 plain_cell):
    other = run_cell(smoke_cfg(*_DISTILL_COMMON, f"model.teacher.path={trained_teacher}", "loss.teacher_cache=false",
                               *extra))
    assert other["train"]["final_loss"] == pytest.approx(plain_cell["train"]["final_loss"], rel=1e-4)
    w_a, w_b = weights(Path(plain_cell["run_dir"])), weights(Path(other["run_dir"]))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-3, atol=1e-5)
    [index] = list((tmp_path / "cache").glob("teacher-*/index.json")) or [None]
    want = {"hidden": "hidden", "auto": "hidden", "logits": "logits"}.get(
        next((e.split("=")[1] for e in extra if e.startswith("loss.teacher_cache=")), None))
    assert (json.loads(index.read_text())["kind"] if index else None) == want


def _untied_biased_student():
    """A GPT-2 whose output head is its own Linear with a bias: not shared with the embedding, so only the fused
    loss's own gradient reaches it (a tied head also gets the embedding's, which hides a lost one)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320, n_positions=96,
                                       tie_word_embeddings=False))
    model.lm_head = torch.nn.Linear(32, 320, bias=True)
    return model


def test_fused_loss_at_zero3_equals_zero0(smoke_cfg, trained_teacher):
    """fused_batch_loss at ZeRO-3 (head weight partitioned) = at ZeRO-0: loss, head gradients, updated weights."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    cfg = smoke_cfg(*_DISTILL_COMMON, "loss.impl=fused", "loss.chunk_size=5", f"model.teacher.path={trained_teacher}")
    eng.setup_distributed(60)
    splits, tok = load_data_and_tokenizer(cfg)
    examples = encoding.encode_records(tok, splits.train[:24], cfg.data, encoding.TruncationStats())
    batches = [encoding.collate_train(examples[i:i + 8], tok.pad_token_id) for i in range(0, 24, 8)]
    teacher = models.load_model(trained_teacher, torch.float32).eval().requires_grad_(False)
    runs_by_stage = {}
    for stage in (0, 3):
        trainer = {**cfg.trainer, "zero_stage": stage, "lr": 1e-2, "warmup_steps": 0}
        engine = eng.initialize(_untied_biased_student(), trainer, 1)
        losses, grads = [], None
        for batch in batches:
            num_tokens = float(response_mask(batch["labels"]).sum())
            loss, _ = fused_batch_loss(cfg, engine, teacher, batch, num_tokens)
            engine.backward(loss)
            head = engine.module.lm_head
            if grads is None:
                grads = [safe_get_full_grad(p).clone() for p in (head.weight, head.bias)]
            engine.step()
            losses.append(loss.item())
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage == 3):
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        runs_by_stage[stage] = losses, grads, weights
    (l0, g0, w0), (l3, g3, w3) = runs_by_stage[0], runs_by_stage[3]
    assert l0[1] != l0[0] and g0[0].abs().sum() > 0  # it trains, and the head gets a gradient
    assert l3 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(g3, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    init = _untied_biased_student().state_dict()
    assert not torch.equal(w3["lm_head.weight"], init["lm_head.weight"])  # the partitioned head was updated
    for k in w0:
        torch.testing.assert_close(w3[k], w0[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_teacher_sharded_across_two_ranks(tmp_path, data_root, trained_teacher, plain_cell):
    """model.teacher.shard=true under torchrun (2 processes): the partitioned teacher's logits, hidden states,
    cache and fused loss equal the full copy's, and a whole cell trains like the replicated one."""
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "tests" / "train" / "sharded_teacher_worker.py"), str(trained_teacher), str(data_root), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**child_env(), "PYTHONPATH": str(root)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2 and r["partitioned"]
        assert r["local_numel"] <= r["full_numel"] // 2 + 64  # each rank holds about half of the teacher
        assert r["logits_max_diff"] <= 1e-6 * max(1.0, r["logits_max_abs"])
        assert r["hidden_max_diff"] <= 1e-6 and r["cache_max_diff"] <= 1e-6
        assert r["fused_losses"]["3"] == pytest.approx(r["fused_losses"]["0"], rel=1e-5)
        assert r["fused_losses"]["3"][1] != r["fused_losses"]["3"][0]
    # Each rank wrote its own share of the cache.
    assert len(ranks[0]["cache_written"]) == len(ranks[1]["cache_written"]) == 1
    assert ranks[0]["cache_written"] != ranks[1]["cache_written"]
    # The cell: 2 ranks x micro-batch 4, sharded teacher, fused at ZeRO-3, hidden cache = 1 rank x 8, live teacher.
    assert ranks[0]["cell_final_loss"] == pytest.approx(plain_cell["train"]["final_loss"], rel=1e-4)
