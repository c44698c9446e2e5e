"""`distill-train`: one grid cell (model pair x divergence x tau x data x seed), top to bottom.

    distill-train divergence=rkl tau=2 model=toy
    distill-train -m divergence=fkl,rkl tau=1,2,4            # a grid
    distill-train -m +sweep=demo hydra/launcher=slurm        # a sweep file on SLURM

Flow: validate config -> distributed env -> run dir from the config signature (skip if done) -> data ->
teacher (frozen) + student (DeepSpeed ZeRO) -> resume from the latest checkpoint -> train with periodic
validation and checkpoints -> export the student as a HF model -> generation + ROUGE-L -> metrics.json.
Side effects (files, W&B, progress bar) happen on rank 0 only.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from distill import data as data_mod
from distill import engine as eng
from distill import evaluate, models, runs
from distill.chunked_losses import fused_distillation_loss, loss_fn_for
from distill.config import ConfigError, validate
from distill.tracking import Tracker

log = logging.getLogger("distill.train")
# conf/ sits next to the package (editable install): an absolute path works however the app is started.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# --------------------------------------------------------------------------------------------- data
def sample_indices(n: int, step: int, micro: int, rank: int, *, world: int, micro_bs: int, grad_accum: int,
                   seed: int, _perms: dict[int, torch.Tensor] = {}) -> list[int]:  # noqa: B006 (memo)
    """Indices of the examples in (step, micro-batch, rank): a pure function of its arguments.

    The stream is a fresh permutation per epoch, seeded by (seed, epoch); resuming at step k therefore
    sees exactly the batches an uninterrupted run would, with no sampler state to checkpoint.
    """
    global_bs = micro_bs * grad_accum * world
    start = step * global_bs + (micro * world + rank) * micro_bs
    out = []
    for g in range(start, start + micro_bs):
        epoch, pos = divmod(g, n)
        # The memo lives in a default argument, not a module global or an lru_cache: `python -m
        # distill.train` cells are pickled by value by submitit, and a module-level helper of
        # __main__ cannot be found again in the child process.
        key = (seed, n, epoch)
        if key not in _perms:
            _perms[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(_perms[key][pos]))
    return out


# --------------------------------------------------------------------------------------------- loss
def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token labels[t+1] is a response token (logits[t] predicts labels[t+1])."""
    return labels[:, 1:] != -100


def _kd_kwargs(cfg: DictConfig, num_tokens: float) -> dict[str, Any]:
    params = {k: v for k, v in cfg.divergence.items() if k != "name"}
    return dict(divergence=cfg.divergence.name, tau=float(cfg.tau), tau_target=cfg.loss.tau_target,
                tau_squared=bool(cfg.loss.tau_squared), num_tokens=num_tokens, **params)


def batch_loss(cfg: DictConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
               labels: torch.Tensor, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    """kd_ratio x distillation + (1 - kd_ratio) x CE, each a masked sum over `num_tokens` global tokens."""
    mask = response_mask(labels)
    s = student_logits[:, :-1]
    kd_ratio = float(cfg.loss.kd_ratio)
    # CE on the response rows only; at kd_ratio=1 it is only logged, so it gets no graph either.
    with torch.set_grad_enabled(kd_ratio < 1.0 and torch.is_grad_enabled()):
        ce = F.cross_entropy(s[mask].float(), labels[:, 1:][mask], reduction="sum") / num_tokens
    if kd_ratio == 0.0:
        return ce, {"ce": ce.item()}
    kd_fn = loss_fn_for(cfg.loss.impl, chunk_size=int(cfg.loss.chunk_size))
    kd = kd_fn(s, teacher_logits[:, :-1], mask, **_kd_kwargs(cfg, num_tokens))
    return kd_ratio * kd + (1.0 - kd_ratio) * ce, {"ce": ce.item(), "kd": kd.item()}


def fused_batch_loss(cfg: DictConfig, engine, teacher, batch: dict, num_tokens: float):
    """The distillation loss from last hidden states and output weights: full logits never exist."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # logits_to_keep=1: the model computes logits for the last position only; we need its hidden states.
    s_hidden = engine(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    with torch.no_grad():
        t_hidden = teacher(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    s_head, t_head = engine.module.get_output_embeddings(), teacher.get_output_embeddings()
    kd = fused_distillation_loss(
        s_hidden[:, :-1], s_head.weight, t_hidden[:, :-1], t_head.weight, response_mask(batch["labels"]),
        chunk_size=int(cfg.loss.chunk_size), student_bias=s_head.bias, teacher_bias=t_head.bias,
        **_kd_kwargs(cfg, num_tokens),
    )
    return kd, {"kd": kd.item()}


# --------------------------------------------------------------------------------------------- helpers
def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def validate_model(student, teacher, val_batches: list[dict], device, rank: int, world: int) -> dict[str, float]:
    """Teacher-forced CE (and FKL/RKL at tau=1 when a teacher exists), exact over all ranks' shards.

    Every rank runs the same number of forwards (ZeRO-3 forwards are collective).
    """
    shard = [{k: v.to(device) for k, v in b.items()} for b in val_batches[rank::world]]
    m = evaluate.teacher_forced_metrics(student, shard, teacher=teacher, allow_empty=True)
    keys = [k for k in ("ce", "fkl", "rkl") if k in m]
    sums = _all_reduce_sum([m[k] * m["tokens"] for k in keys] + [m["tokens"]], device)
    total = max(sums[-1], 1.0)
    return {k: s / total for k, s in zip(keys, sums[:-1])}


def cell_identity(cfg: DictConfig, sig: str) -> dict[str, Any]:
    """The 'cell' block of metrics.json: what a report groups and compares on."""
    return {
        "divergence": cfg.divergence.name if cfg.loss.kd_ratio > 0 else "sft",
        "divergence_params": {k: v for k, v in OmegaConf.to_container(cfg.divergence).items() if k != "name"},
        "tau": float(cfg.tau),
        "tau_target": cfg.loss.tau_target,
        "tau_squared": bool(cfg.loss.tau_squared),
        "kd_ratio": float(cfg.loss.kd_ratio),
        "seed": int(cfg.seed),
        "model": cfg.model.name,
        "teacher": cfg.model.teacher.get("path") if cfg.loss.kd_ratio > 0 else None,
        "student": cfg.model.student.get("path") or f"{cfg.model.get('arch', 'hf')}-init",
        "dataset": cfg.data.name,
        "signature": sig,
    }


# --------------------------------------------------------------------------------------------- the cell
def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """Train + evaluate one cell; return its metrics dict (also written to `<run_dir>/metrics.json`)."""
    validate(cfg)
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    rank, world = eng.setup_distributed(int(cfg.trainer.dist_timeout_s))
    validate(cfg, world_size=world)
    device = eng.device_for(int(os.environ.get("LOCAL_RANK", 0)))
    sig = runs.signature(cfg)
    name = runs.cell_name(cfg)
    rdir = runs.run_dir(cfg)
    if runs.is_completed(rdir) and not cfg.force:
        log.info("skip %s: %s already completed (force=true reruns it)", name, rdir)
        return runs.read_metrics(rdir)
    if rank == 0:
        if cfg.force:
            shutil.rmtree(rdir / eng.CKPT_DIR, ignore_errors=True)
        rdir.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(rdir / "config.yaml", OmegaConf.to_yaml(runs.redact(OmegaConf.to_container(cfg, resolve=True))))
    dist.barrier()

    metrics: dict[str, Any] = {
        "schema_version": runs.SCHEMA_VERSION, "status": "running", "signature": sig, "name": name,
        "sweep": cfg.sweep_name, "cell": cell_identity(cfg, sig), "run_dir": str(rdir),
    }
    tracker = Tracker(
        cfg.logger, run_id=f"{name}-{sig}", name=name, group=cfg.sweep_name,
        tags=[f"div:{metrics['cell']['divergence']}", f"tau:{cfg.tau:g}", f"model:{cfg.model.name}"],
        config=OmegaConf.to_container(cfg, resolve=True), run_dir=rdir, enabled=rank == 0,
    )
    exit_code = 1
    try:
        metrics = _train_and_evaluate(cfg, metrics, tracker, rank, world, device, rdir)
        exit_code = 0
        return metrics
    except Exception as exc:
        if rank == 0:
            metrics.update(status="failed", error=f"{type(exc).__name__}: {exc}", updated_at=runs.now_iso())
            runs.atomic_write_json(rdir / runs.METRICS_FILE, metrics)
        raise
    finally:
        tracker.finish(exit_code)


def _train_and_evaluate(cfg, metrics, tracker, rank, world, device, rdir):
    tcfg = cfg.trainer
    if rank == 0:
        runs.atomic_write_json(rdir / runs.METRICS_FILE, {**metrics, "updated_at": runs.now_iso()})

    # Data + tokenizer (the embedded suite brings its own tokenizer).
    splits = data_mod.load_data(cfg.data, Path(cfg.paths.data_dir))
    tok_path = cfg.model.get("tokenizer") or splits.tokenizer_dir
    if tok_path is None:
        raise ConfigError(f"model.tokenizer is not set and data={cfg.data.name} brings no tokenizer")
    tokenizer = models.load_tokenizer(tok_path, bool(cfg.model.get("trust_remote_code", False)))
    max_len, max_prompt = int(cfg.data.max_length), int(cfg.data.max_prompt_length)
    # The target paraphrase is fixed per example (not per training seed), so every cell of a grid
    # teacher-forces the same sequences and can share one teacher cache.
    trunc = data_mod.TruncationStats()
    encode = lambda recs: [  # noqa: E731
        data_mod.encode_example(tokenizer, r, template=cfg.data.template, max_length=max_len,
                                max_prompt_length=max_prompt, target_index=r.target_index(int(cfg.data.get("target_seed", 0))), stats=trunc)
        for r in recs
    ]
    train_ex, val_ex = encode(splits.train), encode(splits.valid)
    if trunc.prompts_truncated or trunc.responses_truncated:
        log.warning("truncation (max_prompt_length=%d, max_length=%d): %s", max_prompt, max_len, trunc.as_dict())
    pad_id = tokenizer.pad_token_id

    # Models: the teacher is frozen, in eval mode, outside DeepSpeed; no teacher at all for SFT.
    dtype = models.torch_dtype(cfg.trainer.precision if cfg.model.dtype == "auto" else cfg.model.dtype)
    student = models.build_model(cfg.model, "student", tokenizer, dtype, max_len, seed=int(cfg.seed))
    teacher = None
    if cfg.loss.kd_ratio > 0:
        teacher = models.build_model(cfg.model, "teacher", tokenizer, dtype, max_len, seed=int(cfg.seed) + 1)
        teacher.requires_grad_(False).eval().to(device)
        models.check_vocab(student, teacher, tokenizer)
    cache = None
    if teacher is not None and cfg.loss.teacher_cache:
        from distill.teacher_cache import TeacherCache

        cache = TeacherCache.build_or_load(
            Path(cfg.paths.cache_dir), teacher, cfg.model.teacher.path, train_ex, pad_id=pad_id,
            batch_size=int(tcfg.micro_batch_size), topk=cfg.loss.get("teacher_cache_topk"), device=device,
            dtype=dtype, progress=rank == 0 and bool(tcfg.progress),
        )
    engine = eng.initialize(student, tcfg, world)

    state = eng.load_latest_checkpoint(engine, rdir) or {}
    start_step, tokens_seen = int(state.get("step", 0)), int(state.get("tokens", 0))
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    metrics["train"] = {"resumed_from_step": start_step, "truncation": trunc.as_dict()}

    mbs, gas, max_steps = int(tcfg.micro_batch_size), int(tcfg.grad_accum), int(tcfg.max_steps)
    n_val = int(tcfg.val_batches) * world
    val_batches = [data_mod.collate_train(val_ex[i * mbs:(i + 1) * mbs], pad_id) for i in range(n_val)
                   if val_ex[i * mbs:(i + 1) * mbs]]
    val_batches = val_batches[: (len(val_batches) // world) * world]  # equal forwards per rank

    progress = None
    if rank == 0 and tcfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=start_step, desc=runs.cell_name(cfg), unit="step", dynamic_ncols=True)
    t_start, tokens_at_start = time.time(), tokens_seen
    loss_sum, loss_steps = 0.0, 0
    engine.train()
    for step in range(start_step, max_steps):
        ids = [sample_indices(len(train_ex), step, m, rank, world=world, micro_bs=mbs, grad_accum=gas,
                              seed=int(cfg.seed)) for m in range(gas)]
        micro_batches = [data_mod.collate_train([train_ex[i] for i in idx], pad_id) for idx in ids]
        # Exact accumulation: every micro-batch's loss is a masked SUM over the step's global token count.
        local_tokens = sum(int(response_mask(b["labels"]).sum()) for b in micro_batches)
        num_tokens = max(_all_reduce_sum([local_tokens], device)[0], 1.0)
        for idx, batch in zip(ids, micro_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            if cfg.loss.impl == "fused":
                loss, parts = fused_batch_loss(cfg, engine, teacher, batch, num_tokens)
            else:
                s_logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                t_logits = None
                if cache is not None:
                    t_logits = cache.batch_logits(idx, batch["labels"])
                elif teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss, parts = batch_loss(cfg, s_logits, t_logits, batch["labels"], num_tokens)
            # DeepSpeed divides by grad_accum and averages over ranks; our loss is already the global mean.
            engine.backward(loss * gas * world)
            engine.step()
            loss_sum += loss.item()
        loss_steps += 1
        tokens_seen += int(num_tokens)
        done = step + 1

        if done % int(tcfg.log_every) == 0 or done == max_steps:
            # Summed over ranks, the micro-batch losses of a step add up to that step's global mean loss.
            step_loss = _all_reduce_sum([loss_sum], device)[0] / loss_steps
            loss_sum, loss_steps = 0.0, 0
            tps = (tokens_seen - tokens_at_start) / max(time.time() - t_start, 1e-9)
            tracker.log({"train/loss": step_loss, "train/lr": engine.get_lr()[0], "train/tokens": tokens_seen,
                         "train/tokens_per_s": tps, **{f"train/{k}": v for k, v in parts.items()}}, step=done)
            metrics["train"]["final_loss"] = step_loss
            if progress is not None:
                progress.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:,.0f}")
        if int(tcfg.eval_every) and done % int(tcfg.eval_every) == 0 and done != max_steps and val_batches:
            val = validate_model(engine.module, teacher, val_batches, device, rank, world)
            engine.train()
            tracker.log({f"valid/{k}": v for k, v in val.items()}, step=done)
        if int(tcfg.ckpt_every) and done % int(tcfg.ckpt_every) == 0 and done != max_steps:
            eng.save_checkpoint(engine, rdir, done, {"step": done, "tokens": tokens_seen, "torch_rng": torch.get_rng_state()},
                                keep=int(tcfg.keep_ckpts))
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    train_time = time.time() - t_start

    metrics["valid"] = validate_model(engine.module, teacher, val_batches, device, rank, world) if val_batches else {}
    metrics["train"].update(steps=max_steps, tokens=tokens_seen, time_s=round(train_time, 3),
                            tokens_per_s=(tokens_seen - tokens_at_start) / max(train_time, 1e-9))
    metrics["train"].setdefault("final_loss", float("nan"))
    student_dir = rdir / "student"
    eng.export_hf(engine, tokenizer, student_dir, rank)
    del engine, teacher
    if rank != 0:
        return metrics  # evaluation below uses no collectives: the other ranks are done

    # Final evaluation on the exported (plain HF) model: generation + ROUGE-L on every benchmark.
    model = models.load_model(student_dir, torch.float32).to(device)
    metrics["eval"] = evaluate.evaluate_benchmarks(
        model, tokenizer, splits.benchmarks, eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True),
        template=cfg.data.template, max_length=max_len, max_prompt_length=max_prompt,
        out_dir=rdir / "generations",
    )
    metrics.update(status="completed", updated_at=runs.now_iso())
    tracker.log({f"valid/{k}": v for k, v in metrics["valid"].items()}, step=max_steps)
    tracker.log({f"eval/{b}/rougeL": r["rougeL_mean"] for b, r in metrics["eval"].items()}, step=max_steps)
    tracker.summary({"eval": metrics["eval"], "valid": metrics["valid"], "train": metrics["train"]})
    runs.atomic_write_json(rdir / runs.METRICS_FILE, metrics)
    if not tcfg.keep_final_ckpt:
        shutil.rmtree(rdir / eng.CKPT_DIR, ignore_errors=True)
    log.info("%s: %s", metrics["name"], {b: round(r["rougeL_mean"], 2) for b, r in metrics["eval"].items()})
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_cell(cfg)
    except ConfigError as exc:
        # A bad config is the user's to fix: one readable message, no traceback.
        print(f"distill-train: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    scores = [r["rougeL_mean"] for r in (metrics or {}).get("eval", {}).values()]
    return sum(scores) / len(scores) if scores else None


def main() -> None:
    """Console entry point `distill-train`."""
    _hydra_main()


if __name__ == "__main__":
    main()
