"""Our job and TRL's off-policy distillation trainer on the same pair, data, objective, tau and batches, interleaved.

    python -m benchmarks.bench_peers                  # the demo pair, fkl and jsd x tau 1, 2, 150 steps each
    python -m benchmarks.bench_peers --quick          # tiny random-init pair, 6 steps per config: a smoke run (CI)
    python -m benchmarks.bench_peers --objectives jsd --taus 2 --steps 100 model.teacher.path=T model.student.path=S

Which TRL trainer. TRL 1.16's stable `trl.DistillationTrainer` is on-policy only (the student generates every
completion; it has no lmbda). The off-policy trainer is `trl.experimental.gkd.GKDTrainer` with `lmbda=0` (never
generate: train on the dataset's completions) and `seq_kd=False`: that is the one measured. Two facts about it shape
the comparison:
  * Its `beta` is TRL's generalized-JSD coefficient: 0 = forward KL, 1 = reverse KL, 0.5 = JSD; the mixture is
    beta p + (1 - beta) q with p the teacher, exactly our `jsd` with `divergence.beta` = the same beta. So fkl runs
    as beta=0 and jsd as beta=--jsd-beta on both sides.
  * Its `temperature` is only a SAMPLING temperature: `GKDTrainer.compute_loss` calls its own
    `generalized_jsd_loss` without it, so with lmbda=0 a GKDTrainer at temperature=2 trains the tau=1 objective.
    The script shows this on the first batch of every tau != 1 config ("upstream GKDTrainer" line). To compare at
    tau = 2, the TRL side is a subclass whose only change is to pass `temperature` to that same TRL loss function
    (which supports it: logits / tau, no tau^2, as TRL's DistillationTrainer and Liger do); ours runs
    loss.tau_squared=false to match.
It also records each step's loss (TRL's logged loss is rounded), via `training_step`.

What runs. One child process per (objective, tau) config; in it:
  * ours: the job's own pieces: `distill.train.prepare.setup(cfg)` (the composed `distill-train` config: DeepSpeed ZeRO-0
    fp32 engine, frozen teacher, torch AdamW, warmup + cosine, clipping) and, per step, `train_step(cell, step,
    micro_batches=...)` + `after_step(cell, ...)`, then `finish(cell)` (export + generation + ROUGE-L).
  * TRL: GKDTrainer on a student built by the same `distill.models.build_model` (identical initial weights:
    checked), the SAME teacher module, `optimizers=` the same torch AdamW (all parameters decayed, as our
    DeepSpeed config does; HF's default would exempt biases and norms) and the same LambdaLR, max_grad_norm = our
    clipping, fp32, no gradient checkpointing, dropout left as the model has it (none in the toy pairs).
  * The same batches: the job's sampler draws every step's micro-batch once (`sample_batches`); ours trains on it
    (`micro_batches=`), and TRL's dataset is the step numbers with a collator that returns that same micro-batch
    (so its per-device batch size is 1 "row" = one micro-batch of trainer.micro_batch_size examples).
  * Interleaved: TRL's `Trainer.train()` drives; a TrainerCallback runs our step k right after TRL's step k on even
    k, right before it on odd k. TRL's step time is everything between two of its step ends minus our step (data
    loading, forward, loss, backward, clipping, AdamW, schedule, its logging); ours is train_step + after_step.
  * Clocks: wall and process CPU time (torch on 1 thread, the demo cells' setting); medians over the steps after
    --warmup, ratios as ratio of medians and median of per-step (paired) ratios.
  * Peak memory: per step, the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS at the
    step's start: what the step itself allocated at its worst moment (activations, logits, gradients). Weights,
    the teacher and optimizer states are the same on both sides and outside it. The children run with glibc's mmap
    threshold at 1 MiB so freed tensors leave the RSS (as in bench_losses.py).
  * Agreement: per step |loss_TRL - loss_ours| (absolute and relative), and the largest difference between the two
    students' final weights.
  * Final ROUGE-L: both students through our evaluator (`distill.evaluation.generate.evaluate_benchmarks`, the config's eval
    protocol and seeds).
The demo pair is the demo's prep stages (teacher SFT, student warm start: `distill-demo`'s stages 1-2, under
--root); if they are missing they are trained first, by the job, and kept (~3-4 min on 2 idle cores). Nothing is
timed against a threshold: it prints numbers for a person to read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from benchmarks import peers
from benchmarks.bench_losses import reset_peak, status_kib

QUICK_OVERRIDES = ["experiment=smoke", "trainer.micro_batch_size=8", "eval.max_examples=4", "eval.max_new_tokens=8"]


# ----------------------------------------------------------------------------------------------------------
# memory and clocks


class Window:
    """Wall time, CPU time and peak RSS above the start of a measured window; pausable (our step inside TRL's)."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.peak_mib = 0.0
        self._t = self._c = None
        self._base = 0

    def start(self) -> None:
        reset_peak()  # VmHWM back to the current RSS (where /proc/self/clear_refs is not writable: process-wide)
        self._base = status_kib("VmRSS")
        self._t, self._c = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._t
        self.cpu += time.process_time() - self._c
        self.peak_mib = max(self.peak_mib, (status_kib("VmHWM") - self._base) / 1024)


# ----------------------------------------------------------------------------------------------------------
# one config, in its own process


def _config(args, objective: str, tau: float, root: Path):
    from distill.config import compose

    overrides = [
        f"divergence={objective}", f"tau={tau}", "loss.tau_squared=false", "loss.kd_ratio=1.0", "loss.impl=plain",
        "loss.teacher_cache=false", f"trainer.max_steps={args.steps}", "trainer.grad_accum=1",
        "trainer.ckpt_every=0", "trainer.eval_every=0", "trainer.progress=false", f"trainer.num_threads={args.threads}",
        "logger=none", f"paths.root={root}", "sweep_name=bench-peers", "force=true",
        *([f"divergence.beta={args.jsd_beta}"] if objective == "jsd" else []),
        *args.overrides,
    ]
    return compose(overrides)


def _trl_trainer(cell, student, batches: list[dict], trl_beta: float, tau: float, out_dir: Path):
    """GKDTrainer (lmbda=0) on `student`, fed `batches` in order, with the job's optimizer and schedule."""
    import torch
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill.train import engine as eng

    class TRLSide(GKDTrainer):
        """GKDTrainer + the distillation temperature passed to its own loss, + each step's exact loss recorded."""

        pass_tau = True
        step_losses: list[float] = []

        def generalized_jsd_loss(self, *a, **kw):  # compute_loss calls it as self.generalized_jsd_loss(**kw)
            if self.pass_tau:
                kw.setdefault("temperature", self.temperature)
            return GKDTrainer.generalized_jsd_loss(*a, **kw)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.step_losses.append(loss.item())
            return loss

    tcfg = cell.cfg.trainer
    opt = torch.optim.AdamW(student.parameters(), lr=float(tcfg.lr), betas=tuple(tcfg.betas),
                            weight_decay=float(tcfg.weight_decay), foreach=True)
    sched = eng.lr_schedule(opt, int(tcfg.warmup_steps), int(tcfg.max_steps), float(tcfg.min_lr_ratio))
    config = GKDConfig(
        output_dir=str(out_dir), lmbda=0.0, seq_kd=False, beta=trl_beta, temperature=tau, max_steps=len(batches),
        per_device_train_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=float(tcfg.grad_clip),
        learning_rate=float(tcfg.lr), logging_steps=int(tcfg.log_every), save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, seed=int(cell.cfg.seed),
        gradient_checkpointing=False, disable_dropout=False, train_sampling_strategy="sequential",
        dataloader_num_workers=0, log_level="warning", max_length=None,
    )
    # One dataset row per step; the collator hands TRL the job's own micro-batch of that step (same tensors).
    strip = lambda b: {k: b[k] for k in ("input_ids", "attention_mask", "labels")}  # noqa: E731
    trainer = TRLSide(
        model=student, teacher_model=cell.teacher, args=config, processing_class=cell.tokenizer,
        train_dataset=Dataset.from_dict({"step": list(range(len(batches)))}),
        data_collator=lambda rows: dict(strip(batches[rows[0]["step"]])), optimizers=(opt, sched),
    )
    trainer.step_losses = []
    return trainer


def _upstream_loss(trainer, batch: dict) -> float:
    """The loss unmodified GKDTrainer.compute_loss gives on `batch` (no temperature passed), without training."""
    import torch

    trainer.pass_tau = False
    try:
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, dict(batch)).item()
    finally:
        trainer.pass_tau = True


def run_config(args, objective: str, tau: float, root: Path) -> dict[str, Any]:
    """Train both sides interleaved on one config; return per-step records, agreement and final ROUGE-L."""
    import torch
    from omegaconf import OmegaConf
    from transformers import TrainerCallback

    from distill import models
    from distill.evaluation import generate as evaluate
    from distill.train.finish import finish
    from distill.train.prepare import setup
    from distill.train.step import after_step, sample_batches, train_step

    cfg = _config(args, objective, tau, root)
    cell = setup(cfg)
    n_steps = int(cfg.trainer.max_steps)
    batches = [sample_batches(cell, s)[0] for s in range(n_steps)]
    dtype = models.torch_dtype(cfg.trainer.precision if cfg.model.dtype == "auto" else cfg.model.dtype)
    student = models.build_model(cfg.model, "student", cell.tokenizer, dtype, int(cfg.data.max_length),
                                 seed=int(cfg.seed)).to(cell.device)
    same_init = all(torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                      cell.engine.module.state_dict().values()))
    trl_beta = 0.0 if objective == "fkl" else float(cfg.divergence.beta)
    trainer = _trl_trainer(cell, student, batches, trl_beta, tau, root / "trl")
    upstream = _upstream_loss(trainer, batches[0]) if tau != 1.0 else None

    recs: list[dict] = [dict() for _ in range(n_steps)]
    trl_w = Window()

    def ours(k: int) -> None:
        w = Window()
        w.start()
        result = train_step(cell, k, micro_batches=[batches[k]])
        after_step(cell, result)
        w.stop()
        recs[k].update(ours_wall=w.wall, ours_cpu=w.cpu, ours_peak=w.peak_mib, ours_loss=result["loss"])

    class Interleave(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            trl_w.start()

        def on_step_begin(self, a, state, c, **kw):
            if state.global_step % 2 == 1:  # odd steps: ours first (TRL's window pauses around it)
                trl_w.stop()
                ours(state.global_step)
                trl_w.start()

        def on_step_end(self, a, state, c, **kw):
            nonlocal trl_w
            k = state.global_step - 1
            trl_w.stop()
            recs[k].update(trl_wall=trl_w.wall, trl_cpu=trl_w.cpu, trl_peak=trl_w.peak_mib)
            if k % 2 == 0:  # even steps: ours after TRL's
                ours(k)
            trl_w = Window()
            trl_w.start()

    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its log lines would mix with the JSON result on stdout
    trainer.add_callback(Interleave())
    trainer.train()
    for k, loss in enumerate(trainer.step_losses):
        recs[k]["trl_loss"] = loss

    with torch.no_grad():
        weight_diff = max(float((a.float() - b.float()).abs().max()) for a, b in
                          zip(student.state_dict().values(), cell.engine.module.state_dict().values()))
    student.eval()
    trl_eval = evaluate.evaluate_benchmarks(
        student, cell.tokenizer, cell.splits.benchmarks, eval_cfg=OmegaConf.to_container(cfg.eval, resolve=True),
        template=cfg.data.template, max_length=int(cfg.data.max_length),
        max_prompt_length=int(cfg.data.max_prompt_length), out_dir=root / "trl" / "generations")
    ours_eval = finish(cell)["eval"]
    return {
        "objective": objective, "tau": tau, "trl_beta": trl_beta, "steps": recs, "same_init": same_init,
        "upstream_first_loss": upstream, "weight_max_abs_diff": weight_diff,
        "rougeL": {b: {"ours": ours_eval[b]["rougeL_mean"], "trl": trl_eval[b]["rougeL_mean"]} for b in ours_eval},
        "eval_seeds": list(cfg.eval.seeds), "eval_n": {b: r["n"] for b, r in ours_eval.items()},
        "micro_batch": int(cfg.trainer.micro_batch_size), "threads": torch.get_num_threads(),
        "model": f"teacher {cfg.model.teacher.get('path') or 'random init'}, "
                 f"student {cfg.model.student.get('path') or 'random init'}",
    }


# ----------------------------------------------------------------------------------------------------------
# the report


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def summarise(r: dict, warmup: int) -> dict[str, float]:
    """Medians after warm-up, ratios ours/TRL, and loss agreement over every step."""
    steps = r["steps"]
    timed = steps[warmup:] if len(steps) > warmup else steps
    out = {}
    for clock in ("wall", "cpu"):
        ours, trl = [s[f"ours_{clock}"] for s in timed], [s[f"trl_{clock}"] for s in timed]
        out[f"ours_{clock}"], out[f"trl_{clock}"] = _med(ours), _med(trl)
        out[f"ratio_{clock}"] = _med(ours) / _med(trl)
        out[f"paired_{clock}"] = _med([o / t for o, t in zip(ours, trl) if t > 0])
    out["ours_peak"] = max(s["ours_peak"] for s in timed)
    out["trl_peak"] = max(s["trl_peak"] for s in timed)
    out["ratio_peak"] = out["ours_peak"] / out["trl_peak"] if out["trl_peak"] > 0 else math.nan
    diffs = [abs(s["ours_loss"] - s["trl_loss"]) for s in steps]
    rel = [d / max(abs(s["trl_loss"]), 1e-12) for d, s in zip(diffs, steps)]
    out["max_abs"], out["max_rel"] = max(diffs), max(rel)
    out["first_abs"], out["last_abs"] = diffs[0], diffs[-1]
    return out


def report(results: list[dict], args) -> None:
    print("\n### Speed and memory (ours / TRL; < 1: ours is faster or leaner)\n")
    print(f"medians over steps {args.warmup + 1}-{args.steps} (the first {args.warmup} are warm-up); peak = the "
          "largest per-step peak RSS above the step's start\n")
    print("| objective | tau | TRL beta | ours wall ms | TRL wall ms | wall ratio (paired) | ours CPU ms | TRL CPU ms | "
          "CPU ratio (paired) | ours peak MiB | TRL peak MiB | peak ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sums = [(r, summarise(r, args.warmup)) for r in results]
    for r, s in sums:
        print(f"| {r['objective']} | {r['tau']:g} | {r['trl_beta']:g} | {1e3 * s['ours_wall']:.1f} | "
              f"{1e3 * s['trl_wall']:.1f} | {s['ratio_wall']:.3f} ({s['paired_wall']:.3f}) | {1e3 * s['ours_cpu']:.1f} | "
              f"{1e3 * s['trl_cpu']:.1f} | {s['ratio_cpu']:.3f} ({s['paired_cpu']:.3f}) | {s['ours_peak']:.1f} | "
              f"{s['trl_peak']:.1f} | {s['ratio_peak']:.3f} |")
    print("\n### Same computation? (loss per step, all steps; final weights)\n")
    print("| objective | tau | identical init | first step abs diff | max abs diff | max rel diff | last step abs diff | "
          "final weights max abs diff | upstream GKDTrainer first loss (no tau) | ours first loss |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r, s in sums:
        up = "-" if r["upstream_first_loss"] is None else f"{r['upstream_first_loss']:.6f}"
        print(f"| {r['objective']} | {r['tau']:g} | {'yes' if r['same_init'] else 'NO'} | {s['first_abs']:.1e} | "
              f"{s['max_abs']:.1e} | {s['max_rel']:.1e} | {s['last_abs']:.1e} | {r['weight_max_abs_diff']:.1e} | "
              f"{up} | {r['steps'][0]['ours_loss']:.6f} |")
    print("\n### Loss curves (every --curve-every steps)\n")
    print("| step | " + " | ".join(f"{r['objective']} tau={r['tau']:g} ours / TRL" for r in results) + " |")
    print("|---:|" + "---:|" * len(results))
    n = len(results[0]["steps"])
    for k in sorted({*range(0, n, args.curve_every), n - 1}):
        cells = [f"{r['steps'][k]['ours_loss']:.6f} / {r['steps'][k]['trl_loss']:.6f}" for r in results]
        print(f"| {k + 1} | " + " | ".join(cells) + " |")
    first = results[0]
    print(f"\n### Final ROUGE-L (our evaluator: seeds {first['eval_seeds']}, examples per benchmark "
          f"{first['eval_n']})\n")
    benches = list(first["rougeL"])
    print("| objective | tau | " + " | ".join(f"{b} ours / TRL" for b in benches) + " |")
    print("|---|---:|" + "---:|" * len(benches))
    for r in results:
        print(f"| {r['objective']} | {r['tau']:g} | " +
              " | ".join(f"{r['rougeL'][b]['ours']:.2f} / {r['rougeL'][b]['trl']:.2f}" for b in benches) + " |")


# ----------------------------------------------------------------------------------------------------------
# driver


def _quiet() -> None:
    """DeepSpeed, transformers and TRL log a screenful per trainer; keep warnings and errors only."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("DeepSpeed", "deepspeed", "transformers", "trl", "accelerate", "distill"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _demo_pair(root: Path) -> list[str]:
    """Overrides for the demo's teacher and SFT warm start under `root`, trained by the demo's stages if missing."""
    from distill.sweep import demo as demo

    dirs = demo.prep_model_dirs(root)
    if not all((d / "config.json").exists() for d in dirs.values()):
        print(f"# the demo pair is not under {root}: training it with the demo's prep stages (kept for next time)",
              flush=True)
        overrides = demo.prep_overrides(root)
        dirs = {"teacher": demo.stage("teacher SFT", overrides["teacher"]),
                "student": demo.stage("student warm start", overrides["student"])}
    return ["experiment=demo", f"model.teacher.path={dirs['teacher']}", f"model.student.path={dirs['student']}"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objectives", default="fkl,jsd", help="comma list of fkl, jsd")
    ap.add_argument("--taus", default="1,2", help="comma list of distillation temperatures")
    ap.add_argument("--jsd-beta", type=float, default=0.5, help="beta of jsd, ours and TRL's (TRL GKD default 0.5)")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per config (the demo cells' 150)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing medians")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the demo cells use 1)")
    ap.add_argument("--curve-every", type=int, default=25, help="print the loss curves every N steps")
    ap.add_argument("--root", default=os.environ.get("DISTILL_OUTPUT", "outputs"),
                    help="where the demo pair lives (or is trained); the runs go to a temp dir under it")
    ap.add_argument("--quick", action="store_true", help="experiment=smoke (tiny random-init pair), 6 steps, "
                                                         "a 4-example eval: a smoke run")
    ap.add_argument("--json", help="also write the per-step records and summaries to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="distill-train overrides (e.g. model.teacher.path=DIR); any "
                                                 "model* override replaces the demo pair")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.curve_every = min(args.steps, 6), 1, 2
        args.overrides = [*QUICK_OVERRIDES, *args.overrides]
    for o in args.objectives.split(","):
        if o not in ("fkl", "jsd"):
            raise SystemExit(f"--objectives: {o!r} is not one TRL's trainer computes here; allowed: fkl, jsd")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    _quiet()
    if args.child:
        objective, tau, root = args.child.split(":", 2)
        print(json.dumps(run_config(args, objective, float(tau), Path(root))))
        return
    peers.require("trl")
    root = Path(args.root).resolve()
    pair = [] if args.quick or any(o.startswith("model") for o in args.overrides) else _demo_pair(root)
    import torch

    print(f"# bench_peers {time.strftime('%Y-%m-%d %H:%M')}; versions: {peers.versions()}")
    print(f"# machine: {os.cpu_count()} cpus, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"cuda={torch.cuda.is_available()}; TRL side: trl.experimental.gkd.GKDTrainer, lmbda=0, seq_kd=False, "
          "temperature passed to its loss (see --help)")
    print(f"# steps {args.steps} per config, warm-up {args.warmup}, torch threads {args.threads}; overrides: "
          f"{' '.join(pair + args.overrides)}", flush=True)
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}
    # The children get the same arguments plus the pair and a shared data dir (the embedded suite is built once).
    child_argv = [*argv, *pair, f"paths.data_dir={root / 'data'}"]
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-peers-", dir=root) as tmp:
        for objective in args.objectives.split(","):
            for tau in (float(t) for t in args.taus.split(",")):
                t0 = time.time()
                spec = f"{objective}:{tau}:{Path(tmp) / f'{objective}-tau{tau:g}'}"
                cmd = [sys.executable, "-m", "benchmarks.bench_peers", *child_argv, "--child", spec]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.stderr.write(out.stderr[-4000:])
                    raise SystemExit(f"bench_peers: the {objective} tau={tau:g} config failed (stderr above)")
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"# {objective} tau={tau:g}: done in {time.time() - t0:.0f} s", flush=True)
    print(f"# pair: {results[0]['model']}; micro batch {results[0]['micro_batch']}")
    report(results, args)
    if args.json:
        from distill.files import atomic_write_json

        atomic_write_json(Path(args.json), {"versions": peers.versions(), "args": vars(args), "results": [
            {**r, "summary": summarise(r, args.warmup)} for r in results]})
    print(f"\nload avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
