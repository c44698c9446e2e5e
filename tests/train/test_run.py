"""The job, in-process on tiny models: one cell end to end, ZeRO stages, resume, skip, SFT, W&B, torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.train import engine as eng
from distill.cell import fingerprints as inputs
from distill.cell import identity as runs
from distill.cell.results import read_metrics
from distill.train import run as train
from distill.train.run import run_cell, sample_indices


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def test_sample_indices_cover_each_epoch_once_and_split_ranks():
    n, mbs, world, gas = 20, 2, 2, 1
    epoch = []
    for step in range(5):  # 5 steps x 4 examples = one epoch of 20
        for rank in range(world):
            epoch += sample_indices(n, step, 0, rank, world=world, micro_bs=mbs, grad_accum=gas, seed=7)
    assert sorted(epoch) == list(range(n))
    assert sample_indices(n, 3, 0, 1, world=2, micro_bs=2, grad_accum=1, seed=7) == \
        sample_indices(n, 3, 0, 1, world=2, micro_bs=2, grad_accum=1, seed=7)
    assert sample_indices(n, 5, 0, 0, world=2, micro_bs=2, grad_accum=1, seed=7) != \
        sample_indices(n, 0, 0, 0, world=2, micro_bs=2, grad_accum=1, seed=7)  # next epoch reshuffled


@pytest.mark.parametrize("n", [30, 32, 5])
def test_a_steps_examples_depend_on_the_global_batch_not_on_its_split(n):
    """The same examples in each step whether 8 = 8 x 1 x 1, 2 x 4 x 1, 4 x 1 x 2 or 1 x 2 x 4 (micro x accum x world)."""
    splits = [(8, 1, 1), (2, 4, 1), (4, 1, 2), (1, 2, 4)]
    for step in range(9):
        seen = []
        for micro_bs, accum, world in splits:
            ids = [i for m in range(accum) for r in range(world)
                   for i in sample_indices(n, step, m, r, world=world, micro_bs=micro_bs, grad_accum=accum, seed=3)]
            seen.append(sorted(ids))
        assert all(x == seen[0] for x in seen) and len(seen[0]) == 8
    if n >= 8:  # an epoch is n // 8 steps of distinct examples (the last partial batch dropped), then reshuffled
        per_epoch = n // 8
        epoch = [i for step in range(per_epoch) for i in sample_indices(n, step, 0, 0, world=1, micro_bs=8, grad_accum=1, seed=3)]
        assert len(set(epoch)) == per_epoch * 8


def test_smoke_cell_end_to_end(smoke_cfg):
    cfg = smoke_cfg("divergence=rkl", "tau=2")
    m = run_cell(cfg)
    d, fps = inputs.locate(cfg)
    assert m["status"] == "completed" and read_metrics(d) == json.loads(json.dumps(m))
    assert m["cell"]["divergence"] == "rkl" and m["cell"]["tau"] == 2.0
    assert m["cell"]["max_steps"] == 6   # the budget is part of what a report compares
    assert m["signature"] == runs.signature(cfg, inputs=fps) and m["config_signature"] == runs.signature(cfg)
    assert m["inputs"] == fps and set(fps) == {"data.embedded"} and m["host"] and m["pid"]
    assert [a["status"] for a in m["attempts"]] == ["completed"] and m["attempts"][0]["start_step"] == 0
    assert m["train"]["attempts"] == 1
    log = (d / "train.log").read_text()
    assert "step 6/6 loss" in log and log.count(" loss ") >= 3  # the cell's own log, with its loss lines
    assert m["train"]["steps"] == 6 and m["train"]["tokens"] > 0 and m["train"]["tokens_per_s"] > 0
    assert set(m["eval"]) == set(cfg.data.benchmarks)
    for result in m["eval"].values():
        assert 0.0 <= result["rougeL_mean"] <= 100.0 and len(result["rougeL_per_seed"]) == 1
    assert {"ce", "fkl", "rkl"} <= set(m["valid"]) and m["valid"]["fkl"] >= 0
    assert (d / "student" / "model.safetensors").exists() and (d / "config.yaml").exists()
    assert (d / "train_log.jsonl").read_text().count("train/loss") >= 3
    assert not (d / eng.CKPT_DIR).exists()  # optimizer state dropped once the student is exported


def test_finished_cell_is_skipped_and_force_reruns(smoke_cfg, monkeypatch):
    cfg = smoke_cfg()
    first = run_cell(cfg)

    def no_training(*a, **k):
        raise AssertionError("a completed cell must not train again")

    monkeypatch.setattr(eng, "initialize", no_training)
    assert run_cell(cfg) == json.loads(json.dumps(first))
    with pytest.raises(AssertionError, match="must not train again"):
        run_cell(smoke_cfg("force=true"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_stage_0(stage, smoke_cfg, tmp_path):
    ref = run_cell(smoke_cfg("trainer.zero_stage=0", "eval.max_examples=2"))
    m = run_cell(smoke_cfg(f"trainer.zero_stage={stage}", "eval.max_examples=2", f"paths.root={tmp_path}/z{stage}"))
    assert m["status"] == "completed"
    assert m["train"]["final_loss"] == pytest.approx(ref["train"]["final_loss"], rel=1e-4)


def test_bf16_cell_runs(smoke_cfg):
    m = run_cell(smoke_cfg("trainer.precision=bf16", "eval.max_examples=2"))
    assert m["status"] == "completed" and m["train"]["final_loss"] == m["train"]["final_loss"]  # not NaN


def test_gradient_accumulation_is_exact(smoke_cfg, tmp_path):
    one = run_cell(smoke_cfg("trainer.micro_batch_size=8", "trainer.grad_accum=1", "eval.max_examples=2"))
    two = run_cell(smoke_cfg("trainer.micro_batch_size=4", "trainer.grad_accum=2", "eval.max_examples=2",
                             f"paths.root={tmp_path}/acc"))
    assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-4)
    w1, w2 = _weights(Path(one["run_dir"])), _weights(Path(two["run_dir"]))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_kill_and_resume_equals_uninterrupted(smoke_cfg, tmp_path, monkeypatch):
    straight = run_cell(smoke_cfg("eval.max_examples=2", f"paths.root={tmp_path}/straight"))

    real_save = eng.save_checkpoint

    def save_then_die(engine, run_dir, step, client_state, keep):
        real_save(engine, run_dir, step, client_state, keep)
        raise RuntimeError(f"killed after checkpoint at step {step}")

    cfg = smoke_cfg("eval.max_examples=2", f"paths.root={tmp_path}/resumed")
    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed after checkpoint at step 3"):
        run_cell(cfg)
    assert read_metrics(inputs.locate(cfg)[0])["status"] == "failed"
    monkeypatch.setattr(eng, "save_checkpoint", real_save)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == 3
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-5)
    w_a, w_b = _weights(Path(straight["run_dir"])), _weights(Path(resumed["run_dir"]))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)


def test_train_step_takes_a_callers_micro_batches_like_its_own(smoke_cfg, tmp_path):
    own = train.setup(smoke_cfg("trainer.micro_batch_size=4", "trainer.grad_accum=2", f"paths.root={tmp_path}/own"))
    given = train.setup(smoke_cfg("trainer.micro_batch_size=4", "trainer.grad_accum=2", f"paths.root={tmp_path}/given"))
    laps: list[str] = []
    a = train.train_step(own, 0, lap=laps.append)
    # The same rows as plain collated batches, without example ids: what an on-policy loop would pass.
    batches = [{k: v for k, v in b.items() if k != train.EXAMPLE_IDS} for b in train.sample_batches(given, 0)]
    b = train.train_step(given, 0, batches)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["tokens"] == b["tokens"] > 0
    assert own.progress.step == given.progress.step == 1 and own.progress.tokens == a["tokens"]
    assert laps == ["data"] + ["forward", "loss", "backward", "step"] * 2  # the segments a benchmark times
    for p_own, p_given in zip(own.engine.module.parameters(), given.engine.module.parameters()):
        torch.testing.assert_close(p_own, p_given)
    with pytest.raises(ValueError, match=r"needs 2 micro-batches \(the schedule.s accumulation\), got 1"):
        train.train_step(given, 1, batches[:1])
    assert set(train.validate(own)) == {"ce", "fkl", "rkl"}


def test_a_failure_in_setup_is_recorded(smoke_cfg, monkeypatch):
    from distill import models

    def broken(*a, **k):
        raise RuntimeError("no such architecture")

    monkeypatch.setattr(models, "build_model", broken)
    cfg = smoke_cfg()
    with pytest.raises(RuntimeError, match="no such architecture"):
        run_cell(cfg)
    [metrics_file] = Path(cfg.paths.sweep_dir).glob("*/metrics.json")  # the cell dir also names its inputs
    m = json.loads(metrics_file.read_text())
    assert m["status"] == "failed" and m["error"] == "RuntimeError: no such architecture"


SELECT = ["trainer.select=loss", "trainer.eval_every=2", "trainer.ckpt_every=2", "eval.max_examples=2"]


def _dev_losses(monkeypatch, by_step: dict[int, float]) -> None:
    """Crafted dev losses per evaluation step, so which checkpoint wins is known in advance."""
    monkeypatch.setattr(train, "validate", lambda cell: {"ce": by_step[cell.progress.step]})


def test_selection_by_dev_loss_exports_and_evaluates_the_best_evaluation(smoke_cfg, tmp_path, monkeypatch):
    _dev_losses(monkeypatch, {2: 0.5, 4: 0.9, 6: 0.8})
    m = run_cell(smoke_cfg(*SELECT, "trainer.keep_ckpts=5", "trainer.keep_final_ckpt=true"))
    d = Path(m["run_dir"])
    assert m["selection"]["by"] == "loss" and m["selection"]["step"] == 2 and m["selection"]["value"] == 0.5
    assert [e["step"] for e in m["selection"]["evaluations"]] == [2, 4, 6]
    assert m["valid"] == {"ce": 0.5}  # the selected checkpoint's validation, not the last one's
    # the exported (and evaluated) student is the model of step 2, not of step 6
    at_2 = torch.load(d / eng.CKPT_DIR / "step00000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    at_4 = torch.load(d / eng.CKPT_DIR / "step00000004" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    student = _weights(d)
    assert all(torch.equal(student[k], at_2[k].float()) for k in student)
    assert not all(torch.equal(student[k], at_4[k].float()) for k in student)
    assert not (d / train.SELECTED_DIR).exists()


def test_selection_survives_kill_and_resume(smoke_cfg, tmp_path, monkeypatch):
    _dev_losses(monkeypatch, {2: 0.5, 4: 0.4, 6: 0.9})  # step 4 wins; the cell is killed right after it
    straight = run_cell(smoke_cfg(*SELECT, f"paths.root={tmp_path}/straight"))
    real_save = eng.save_checkpoint

    def save_then_die(engine, run_dir, step, client_state, keep):
        real_save(engine, run_dir, step, client_state, keep)
        if step == 4:
            raise RuntimeError("killed after checkpoint at step 4")

    cfg = smoke_cfg(*SELECT, f"paths.root={tmp_path}/resumed")
    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="step 4"):
        run_cell(cfg)
    monkeypatch.setattr(eng, "save_checkpoint", real_save)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == 4 and resumed["selection"]["step"] == straight["selection"]["step"] == 4
    w_a, w_b = _weights(Path(straight["run_dir"])), _weights(Path(resumed["run_dir"]))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)


def test_selection_by_dev_rouge_l_generates_on_the_validation_split(smoke_cfg):
    m = run_cell(smoke_cfg("trainer.select=rougeL", "trainer.select_examples=4", "trainer.eval_every=3",
                           "eval.max_examples=2"))
    evals = m["selection"]["evaluations"]
    assert [e["step"] for e in evals] == [3, 6] and all(0.0 <= e["select"] <= 100.0 for e in evals)
    best = max(evals, key=lambda e: e["select"])  # ties keep the earlier one
    assert m["selection"]["step"] == best["step"] and m["selection"]["value"] == best["select"]


def test_sft_mode_loads_no_teacher(smoke_cfg, monkeypatch):
    from distill import models

    roles = []
    real_build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda cfg, role, *a, **k: roles.append(role) or real_build(cfg, role, *a, **k))
    m = run_cell(smoke_cfg("loss.kd_ratio=0", "eval.max_examples=2"))
    assert roles == ["student"]
    assert m["name"].startswith("sft-") and m["cell"]["divergence"] == "sft" and m["cell"]["teacher"] is None
    assert "fkl" not in m["valid"] and m["valid"]["ce"] > 0


def test_wandb_run_of_a_resumed_cell_holds_every_step_once(smoke_cfg, monkeypatch):
    import wandb

    from distill.train import run as train
    from distill.tracking import wandb_run as tracking
    from distill.tracking import offline as wandb_offline

    cfg = smoke_cfg("logger=wandb", "logger.mode=offline", "eval.max_examples=2", "sweep_name=wb")
    real_after_step = train.after_step

    def die_after_step_4(cell, result, *rest):   # step 4 is logged, the last checkpoint is at step 3
        real_after_step(cell, result, *rest)
        if result["step"] == 4:
            raise RuntimeError("killed after step 4")

    monkeypatch.setattr(train, "after_step", die_after_step_4)
    with pytest.raises(RuntimeError, match="killed after step 4"):
        run_cell(cfg)
    monkeypatch.setattr(train, "after_step", real_after_step)
    m = run_cell(cfg)                      # resumes at step 3, so it trains and logs step 4 again
    assert m["train"]["resumed_from_step"] == 3
    # In a process that already hosts a W&B service (earlier in-process runs of the suite), the
    # service may still be writing the finished run's records; teardown waits until they are on disk.
    wandb.teardown()
    rid = tracking.run_id("wb", m["name"], m["signature"])
    files = wandb_offline.run_files(Path(cfg.paths.sweep_dir), rid)   # the sweep's own W&B folder
    assert len(files) == 2

    def steps(key):
        return sorted(r["_step"] for f in files for r in wandb_offline.history_rows(f) if key in r)

    # synced, the two attempts append into one run: every metric at every step once
    assert steps("train/loss") == [2, 4, 6] and steps("valid/ce") == [3, 6] and steps("eval/test/rougeL") == [6]
    info, config = wandb_offline.run_info(files[-1])
    assert (info["job_type"], info["group"]) == ("distill", "wb") and config["tau"] == 1.0
    summary = wandb_offline.final_summary(files[-1])
    assert summary["eval/test/rougeL"] == pytest.approx(m["eval"]["test"]["rougeL_mean"])
    assert summary["valid/fkl"] == pytest.approx(m["valid"]["fkl"]) and summary["tau"] == 1.0
    assert summary["eval/test/generations"]["_type"] == "table-file" and summary["train/steps"] == 6
    assert not [k for k in summary if "." in k]


def test_pretrained_teacher_and_warm_start_from_a_previous_cell(smoke_cfg, tmp_path):
    teacher = run_cell(smoke_cfg("experiment=[smoke,teacher]", "eval.max_examples=2", f"paths.root={tmp_path}/t"))
    t_dir = Path(teacher["run_dir"]) / "student"
    m = run_cell(smoke_cfg(f"model.teacher.path={t_dir}", "model.teacher.allow_random=false",
                           f"model.student.path={t_dir}", "eval.max_examples=2", "trainer.log_every=1"))
    assert m["status"] == "completed" and m["cell"]["teacher"] == str(t_dir)
    # Student == teacher when loaded: the first step's distillation loss is zero.
    first = json.loads((Path(m["run_dir"]) / "train_log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["train/kd"] < 1e-6


def _env():
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return env


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill.train", "experiment=smoke", "tau=0", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 2
    assert "config error: tau=0: the distillation temperature must be a finite number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/*/metrics.json"))


@pytest.mark.slow
def test_two_process_torchrun_zero3(tmp_path, data_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.train",
           "experiment=smoke", "trainer.zero_stage=3", "trainer.micro_batch_size=4", "eval.max_examples=2",
           f"paths.root={tmp_path}", f"paths.data_dir={data_root}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [metrics_file] = list(tmp_path.glob("adhoc/*/metrics.json"))
    m = json.loads(metrics_file.read_text())
    assert m["status"] == "completed" and m["train"]["tokens"] > 0
    assert (metrics_file.parent / "student" / "model.safetensors").exists()


@pytest.mark.slow
def test_global_batch_is_the_same_on_one_and_two_processes(tmp_path, data_root):
    """One global batch of 8, split 2 x 4 on one process and 2 x 2 x 2 ranks under torchrun: the same cell
    (signature, dir), the same examples and tokens per step, the same trained weights."""
    from tests.conftest import compose

    common = ["experiment=smoke", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "eval.max_examples=2",
              f"paths.data_dir={data_root}"]
    one = run_cell(compose([*common, f"paths.root={tmp_path}/one"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distill.train",
           *common, f"paths.root={tmp_path}/two"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [metrics_file] = list((tmp_path / "two").glob("adhoc/*/metrics.json"))
    two = json.loads(metrics_file.read_text())
    assert two["signature"] == one["signature"] and metrics_file.parent.name == Path(one["run_dir"]).name
    assert (one["train"]["world_size"], one["train"]["grad_accum"], two["train"]["world_size"], two["train"]["grad_accum"]) \
        == (1, 4, 2, 2)
    for m in (one, two):
        assert (m["train"]["global_batch_size"], m["train"]["micro_batch_size"]) == (8, 2)
    assert two["train"]["tokens"] == one["train"]["tokens"]  # the same examples, step by step
    w_one, w_two = _weights(Path(one["run_dir"])), _weights(metrics_file.parent)
    for k in w_one:
        torch.testing.assert_close(w_one[k], w_two[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, data_root):
    """A teacher dir made by the job itself (SFT, a few steps): what distillation cells load."""
    from tests.conftest import compose

    root = tmp_path_factory.mktemp("teacher")
    m = run_cell(compose(["experiment=[smoke,teacher]", f"paths.root={root}", f"paths.data_dir={data_root}",
                          "eval.max_examples=2"]))
    return Path(m["run_dir"]) / "student"


@pytest.fixture(scope="module")
def plain_cell(tmp_path_factory, data_root, trained_teacher):
    """The reference: live teacher, plain loss, ZeRO-0."""
    from tests.conftest import compose

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
    w_a, w_b = _weights(Path(plain_cell["run_dir"])), _weights(Path(other["run_dir"]))
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

    from distill.data import records as data_mod
    from distill import models
    from distill.train.run import fused_batch_loss, load_data_and_tokenizer, response_mask

    cfg = smoke_cfg(*_DISTILL_COMMON, "loss.impl=fused", "loss.chunk_size=5", f"model.teacher.path={trained_teacher}")
    eng.setup_distributed(60)
    splits, tok = load_data_and_tokenizer(cfg)
    examples = data_mod.encode_records(tok, splits.train[:24], cfg.data, data_mod.TruncationStats())
    batches = [data_mod.collate_train(examples[i:i + 8], tok.pad_token_id) for i in range(0, 24, 8)]
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(root)}, timeout=900)
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
