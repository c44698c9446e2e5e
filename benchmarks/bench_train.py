"""One training step of the job (DeepSpeed engine + `batch_loss`) versus a bare PyTorch loop, side by side.

    python -m benchmarks.bench_train                 # demo sizes, all variants: ~2 min on a shared 2-core CPU
    python -m benchmarks.bench_train --quick         # 12 rounds, bare and job-z0 only: a smoke run (~20 s)
    python -m benchmarks.bench_train --variants job-z0,job-z3 --rounds 20 --profile

What is compared (same models, same batches, same math):
  bare      plain PyTorch: student forward, teacher forward under no_grad,
            `distill.losses.divergences.distillation_loss` (fkl, tau=2, tau^2, summed over response tokens / their count),
            loss.backward(), torch.nn.utils.clip_grad_norm_, torch.optim.AdamW, the job's LR schedule
            (`distill.train.engine.lr_schedule` down to the job's floor, `distill.train.engine.min_lr_ratio`).
  bare-jobloss  the bare loop with the job's `batch_loss` instead of `distillation_loss`: batch_loss also computes
            the CE term (logged; weight 1 - kd_ratio = 0 here, yet in the graph), so job-z0 vs bare-jobloss is
            DeepSpeed alone and bare-jobloss vs bare is the CE term alone.
  job-zN    the job's own step, `distill.train.step.train_step`, on a cell of its own from
            `distill.train.prepare.setup` (ZeRO stage N, fp32, world size 1, the live teacher:
            loss.teacher_cache=false, as the bare loop): the real thing, minus the loop's logging, validation and
            checkpoints (`after_step`). Its segments come from train_step's `lap` hook.
  job-z0-bf16  the same with trainer.precision=bf16 (student AND teacher in bf16, as the job does). Its ratio is
            against the fp32 bare loop: it says what bf16 buys here, not a like-for-like overhead.
The job-z0 cell is the reference: the bare loops take its encoded training examples, tokenizer, config and teacher.
Every variant has its own student built from the same seed (identical initial weights) and its own optimizer; every
job cell builds its random-init toy GPT-2 teacher from the same seed too (timing does not depend on its weights).
Demo sizes (conf/experiment/demo.yaml): teacher 4L/128d, student 2L/64d, embedded data with template alpaca_compact,
global batch = micro batch = 32, vocab 512.

Method (the machine is shared and noisy, so nothing is timed in isolation):
  * Every variant steps through the SAME sequence of batches (the job's sampler, `sample_indices`, is a pure
    function of the step and the global batch).
  * Warm-up: the first --warmup steps of each variant are run (interleaved) and discarded.
  * Then --rounds rounds; in each round every variant runs the same --block consecutive steps, in a freshly
    shuffled order. Seconds/step is the median over all measured steps; the ratio is reported twice: ratio of the
    medians, and the median (with 25-75 % range) of the per-round ratios (paired: same steps, same minute of load).
  * Two clocks: wall time (what a user waits) and process CPU time (time.process_time: the work this process did,
    nearly blind to other users' load, which on a shared 2-core box can triple wall times). When the two disagree,
    trust CPU time for the overhead and wall time for "how long will my run take".
  * Per-step segments (data / forward / loss / backward / optimizer step, CPU ms) show WHERE a difference comes from.
  * --threads (default 1, like the demo's cells) pins torch's intra-op threads to limit noise from other users.
  * --profile adds a torch.profiler comparison: the ops whose self CPU time per step differs most between job-z0
    and bare (profiled over 10 further steps each; the profiler's own overhead inflates both alike).
There are no timed assertions: this prints numbers for a person to read. Target (the Performance issue): job/bare
<= 1.10x at ZeRO-0 fp32.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

TARGET = 1.10
ALL_VARIANTS = ("bare", "bare-jobloss", "job-z0", "job-z1", "job-z2", "job-z3", "job-z0-bf16")
SEGMENTS = ("data", "forward", "loss", "backward", "step")


# ----------------------------------------------------------------------------------------------------------
# setup shared with bench_teacher_cache.py and bench_teacher_scale.py


def quiet() -> None:
    """DeepSpeed and transformers log a screenful per engine; keep warnings only (minus torch's deprecations)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on every from_pretrained
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def machine_line() -> str:
    """CPU, core count, load and library versions: the context every number below depends on."""
    import deepspeed
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = "n/a" if not hasattr(os, "getloadavg") else " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, load avg {load}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), deepspeed {deepspeed.__version__}, "
            f"transformers {transformers.__version__}, cuda={torch.cuda.is_available()}")


class Clock:
    """Segments of one step: `lap(name)` adds the wall and the process CPU time since the previous lap to `name`.

    Process CPU time (all threads of this process) barely moves when other users load the machine, whereas wall
    time absorbs every wait for a core: both are kept, CPU time is the less noisy estimate of the work done.
    """

    def __init__(self) -> None:
        self.t, self.c = time.perf_counter(), time.process_time()
        self.wall: dict[str, float] = dict.fromkeys(SEGMENTS, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(SEGMENTS, 0.0)
        self.loss = float("nan")  # the step's loss, to check that variants compute the same thing

    def lap(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name] += t - self.t
        self.cpu[name] += c - self.c
        self.t, self.c = t, c


# ----------------------------------------------------------------------------------------------------------
# the two step functions


def job_step(cell, step: int) -> Clock:
    """One optimizer step of the job (`distill.train.step.train_step` on `cell`), timed segment by segment through its
    `lap` hook; the clock carries the step's loss."""
    from distill.train.step import train_step

    clock = Clock()
    clock.loss = train_step(cell, step, lap=clock.lap)["loss"]
    return clock


def make_bare_step(ref, student, job_loss: bool = False) -> Callable[[int], Clock]:
    """A plain PyTorch loop with the job's math: same sampler, loss, AdamW settings, clipping and LR schedule, on
    the training examples, tokenizer, config and teacher of the job's cell `ref` (`distill.train.prepare.setup`) and a
    `student` of its own.

    job_loss=True swaps `distillation_loss` for the job's `batch_loss` (which also computes the CE term), so that
    the difference to the job is DeepSpeed alone.
    """
    from distill.data.encoding import collate_train, response_mask
    from distill.train.engine import lr_schedule, min_lr_ratio
    from distill.losses.divergences import distillation_loss
    from distill.train.objective import batch_loss
    from distill.train.step import sample_indices

    cfg, teacher, train_ex, pad_id = ref.cfg, ref.teacher, ref.train_examples, ref.tokenizer.pad_token_id
    t, plan = cfg.trainer, ref.schedule.batch
    # The bare loop runs one batch per step. Drawn as the job draws its first micro-batch, it is the job's whole
    # step when the global batch is one micro-batch on one rank (the demo's: global batch = micro batch = 32).
    if (plan.accum, plan.world) != (1, 1):
        raise ValueError(f"the bare loop needs one micro-batch per step to see the job's batches: global batch "
                         f"{plan.global_batch} is {plan.accum} x {plan.micro} on {plan.world} rank(s); set "
                         "trainer.micro_batch_size to the global batch size")
    opt = torch.optim.AdamW(student.parameters(), lr=float(t.lr), betas=tuple(t.betas),
                            weight_decay=float(t.weight_decay))
    sched = lr_schedule(opt, int(t.warmup_steps), ref.schedule.max_steps, min_lr_ratio(t))
    student.train()

    def step_fn(step: int) -> Clock:
        clock = Clock()
        idx = sample_indices(len(train_ex), step, 0, 0, world=1, micro_bs=plan.micro, grad_accum=plan.accum,
                             seed=int(cfg.seed))
        batch = collate_train([train_ex[i] for i in idx], pad_id)
        mask = response_mask(batch["labels"])
        clock.lap("data")
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            tl = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        clock.lap("forward")
        if job_loss:
            loss, _parts = batch_loss(cfg, s, tl, batch["labels"], max(float(mask.sum()), 1.0))
        else:
            loss = distillation_loss(s[:, :-1], tl[:, :-1], mask, divergence=cfg.divergence.name, tau=float(cfg.tau))
        clock.lap("loss")
        loss.backward()
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(student.parameters(), float(t.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        clock.loss = loss.item()
        clock.lap("step")
        return clock

    return step_fn


# ----------------------------------------------------------------------------------------------------------
# the interleaved timing harness (also used by bench_teacher_cache.py)


def interleave(step_fns: dict[str, Callable[[int], Clock]], *, warmup: int, rounds: int, block: int,
               seed: int = 0, first_step: int = 0) -> dict[str, Any]:
    """Run every variant over the same steps, alternating in shuffled order per round; return per-step records.

    Result: res["first_loss"][variant] = loss of the first warm-up step, and for clock in ("wall", "cpu"):
    res[clock]["steps"][variant] = seconds of every measured step, res[clock]["rounds"][variant] = median
    seconds/step of each round, res[clock]["segments"][variant][segment] = that segment's seconds in every step.
    """
    rng = random.Random(seed)
    names = list(step_fns)
    first_loss: dict[str, float] = {}
    for s in range(first_step, first_step + warmup):
        for name in rng.sample(names, len(names)):
            first_loss.setdefault(name, step_fns[name](s).loss)
    res: dict[str, Any] = {c: {"steps": {n: [] for n in names}, "rounds": {n: [] for n in names},
                               "segments": {n: {k: [] for k in SEGMENTS} for n in names}} for c in ("wall", "cpu")}
    res["first_loss"] = first_loss
    for r in range(rounds):
        start = first_step + warmup + r * block
        for name in rng.sample(names, len(names)):
            times: dict[str, list[float]] = {"wall": [], "cpu": []}
            for s in range(start, start + block):
                clock = step_fns[name](s)
                for c, parts in (("wall", clock.wall), ("cpu", clock.cpu)):
                    times[c].append(sum(parts.values()))
                    for k, v in parts.items():
                        res[c]["segments"][name][k].append(v)
            for c in ("wall", "cpu"):
                res[c]["steps"][name] += times[c]
                res[c]["rounds"][name].append(statistics.median(times[c]))
    return res


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(25 %, median, 75 %) of xs."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def bootstrap_ci(xs: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of xs."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def ratios(res: dict[str, Any], name: str, base: str) -> dict[str, tuple[float, float, float, float]]:
    """Per clock: (median s/step, ratio of medians, and the 25/50/75 % of the per-round ratios) of name vs base."""
    out = {}
    for c in ("wall", "cpu"):
        med, med_base = statistics.median(res[c]["steps"][name]), statistics.median(res[c]["steps"][base])
        paired = [a / b for a, b in zip(res[c]["rounds"][name], res[c]["rounds"][base])]
        out[c] = (med, med / med_base, *quantiles(paired))
    return out


def ratio_table(res: dict[str, Any], base: str) -> list[str]:
    """Markdown rows: per variant, wall and CPU seconds/step with their ratios to `base`."""
    rows = [f"| variant | wall s/step | wall / {base} | per-round wall ratio: median [25%, 75%] "
            f"| CPU s/step | CPU / {base} | per-round CPU ratio: median [25%, 75%] |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in res["wall"]["steps"]:
        r = ratios(res, name, base)
        cells = [f"{m:.4f} | {x:.3f} | {q2:.3f} [{q1:.3f}, {q3:.3f}]" for m, x, q1, q2, q3 in (r["wall"], r["cpu"])]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def segment_table(res: dict[str, Any], clock: str = "cpu") -> list[str]:
    """Markdown rows: median milliseconds per step segment, per variant."""
    rows = ["| variant | " + " | ".join(f"{s} ms" for s in SEGMENTS) + " | sum ms |",
            "|---|" + "---:|" * (len(SEGMENTS) + 1)]
    for name, segs in res[clock]["segments"].items():
        meds = [statistics.median(segs[s]) * 1e3 for s in SEGMENTS]
        rows.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in meds) + f" | {sum(meds):.1f} |")
    return rows


def profile(step_fns: dict[str, Callable], steps: list[int], top: int) -> None:
    """torch.profiler over `steps` per variant; print the ops whose self CPU time differs most from the first.

    The first variant is the reference (bare): a positive difference is time the other variant spends on top.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    per_op: dict[str, dict[str, tuple[float, float]]] = {}
    for name, fn in step_fns.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in steps:
                fn(s)
        n = len(steps)
        per_op[name] = {e.key: (e.self_cpu_time_total / 1e3 / n, e.count / n) for e in prof.key_averages()}
    ref, *others = list(per_op)
    for name in others:
        keys = set(per_op[ref]) | set(per_op[name])
        diff = {k: per_op[name].get(k, (0.0, 0.0))[0] - per_op[ref].get(k, (0.0, 0.0))[0] for k in keys}
        total = sum(v[0] for v in per_op[name].values()) - sum(v[0] for v in per_op[ref].values())
        print(f"\nprofile, {len(steps)} steps: self CPU ms per step, {name} minus {ref} (total {total:+.1f} ms/step); "
              f"top {top} ops by |difference|:\n")
        print(f"| op | {ref} ms | {name} ms | difference ms | {ref} calls | {name} calls |")
        print("|---|---:|---:|---:|---:|---:|")
        for k in sorted(keys, key=lambda k: -abs(diff[k]))[:top]:
            (a_ms, a_n), (b_ms, b_n) = per_op[ref].get(k, (0.0, 0.0)), per_op[name].get(k, (0.0, 0.0))
            print(f"| {k[:60]} | {a_ms:.2f} | {b_ms:.2f} | {diff[k]:+.2f} | {a_n:g} | {b_n:g} |")


def verdict(res: dict[str, Any]) -> list[str]:
    """job-z0 vs bare against the target: per-round ratio with a bootstrap CI, and the overhead outside the forward."""
    lines = []
    for c in ("wall", "cpu"):
        paired = [a / b for a, b in zip(res[c]["rounds"]["job-z0"], res[c]["rounds"]["bare"])]
        lo, hi = bootstrap_ci(paired)
        med = statistics.median(paired)
        met = "met" if hi <= TARGET else "met by the median, not by the whole CI" if med <= TARGET else "NOT met"
        lines.append(f"target job-z0 / bare <= {TARGET:.2f} ({c}, per-round ratio): {med:.3f}, "
                     f"95% CI [{lo:.3f}, {hi:.3f}] -> {met}")
    seg = {n: {k: statistics.median(v) for k, v in res["cpu"]["segments"][n].items()} for n in ("bare", "job-z0")}
    extra = sum(seg["job-z0"][k] - seg["bare"][k] for k in SEGMENTS if k != "forward")
    lines.append(f"job-z0 extra CPU outside the forward segment (data+loss+backward+step, medians): {extra * 1e3:+.1f} ms "
                 f"= {extra / sum(seg['bare'].values()):+.1%} of a bare step (the forward segment runs the same modules "
                 "in both; its difference is mostly noise from the teacher forward)")
    return lines


# ----------------------------------------------------------------------------------------------------------
# main


def build(overrides: list[str], variant: str, ref):
    """The step function of one variant: a job cell of its own (`distill.train.prepare.setup`; ZeRO-0 fp32 is `ref`
    itself) or, for the bare loops, a student of its own (same seed => same initial weights) on `ref`'s data,
    config and teacher."""
    from distill import models
    from distill.train.prepare import setup
    from distill.config import compose

    if variant.startswith("bare"):
        cfg = ref.cfg
        student = models.build_model(cfg.model, "student", ref.tokenizer, torch.float32, int(cfg.data.max_length),
                                     seed=int(cfg.seed))
        return make_bare_step(ref, student, job_loss=variant == "bare-jobloss")
    precision = "bf16" if variant.endswith("bf16") else "fp32"
    stage = int(variant.split("-")[1][1])
    cell = ref if (stage, precision) == (0, "fp32") else setup(
        compose(overrides + [f"trainer.zero_stage={stage}", f"trainer.precision={precision}"]))
    return lambda step: job_step(cell, step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 12 rounds of 1 step, bare and job-z0 only")
    p.add_argument("--variants", default=None,
                   help=f"comma list out of {','.join(ALL_VARIANTS)} (default: all; --quick: bare,job-z0)")
    p.add_argument("--warmup", type=int, default=5, help="discarded steps per variant (default 5)")
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds (default 60)")
    p.add_argument("--block", type=int, default=1, help="consecutive steps per variant per round (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, like the demo cells)")
    p.add_argument("--data-dir", default=None, help="where the embedded suite is generated/cached (default: a tmp dir)")
    p.add_argument("--profile", action="store_true", help="also compare torch.profiler op times of job-z0 and bare")
    p.add_argument("overrides", nargs="*",
                   help="extra Hydra overrides on top of experiment=demo (e.g. trainer.global_batch_size=16 "
                        "trainer.micro_batch_size=16; the bare loop needs global batch = micro batch)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.rounds, args.block = 2, 12, 1
    if args.variants is None:
        args.variants = "bare,job-z0" if args.quick else ",".join(ALL_VARIANTS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad or not variants:
        p.error(f"--variants {args.variants!r}: allowed are {', '.join(ALL_VARIANTS)}")
    if "bare" not in variants:
        variants.insert(0, "bare")  # every ratio is against it
    torch.set_num_threads(args.threads)
    quiet()

    from distill.train.prepare import setup
    from distill.config import compose

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        data_dir = Path(args.data_dir) if args.data_dir else root / "data"
        overrides = ["experiment=demo", "logger=none", f"paths.root={root}", f"paths.data_dir={data_dir}",
                     "model.teacher.allow_random=true", "model.student.path=null", "divergence=fkl", "tau=2.0",
                     "loss.teacher_cache=false", "trainer.num_threads=null", "trainer.progress=false",
                     *args.overrides]
        # The reference cell (ZeRO-0, fp32): job-z0 itself, and the data, config and teacher of the bare loops.
        ref = setup(compose(overrides + ["trainer.zero_stage=0", "trainer.precision=fp32"]))
        cfg, train_ex, plan = ref.cfg, ref.train_examples, ref.schedule.batch
        fns = {v: build(overrides, v, ref) for v in variants}
        print(f"# bench_train: job step vs bare PyTorch step ({time.strftime('%Y-%m-%d %H:%M')})\n")
        print(f"machine: {machine_line()}")
        print(f"config: experiment=demo divergence={cfg.divergence.name} tau={cfg.tau} "
              f"global_batch={plan.global_batch} micro_batch={plan.micro} grad_accum={plan.accum} "
              f"teacher={dict(cfg.model.teacher)} student={dict(cfg.model.student)} (random init), "
              f"{len(train_ex)} train examples, extra overrides {args.overrides}")
        print(f"method: {args.warmup} warm-up steps, then {args.rounds} rounds x {args.block} steps per variant, "
              f"variants shuffled per round, medians\n")
        res = interleave(fns, warmup=args.warmup, rounds=args.rounds, block=args.block)
        print("same math: loss of the first step (same weights, same batch) per variant: "
              + ", ".join(f"{k} {v:.6f}" for k, v in res["first_loss"].items()) + "\n")
        print("\n".join(ratio_table(res, "bare")))
        print("\nper-step segments, median process-CPU ms (job 'loss' includes batch_loss's CE term; 'step' is "
              "clipping + AdamW + LR schedule):\n")
        print("\n".join(segment_table(res, "cpu")))
        if "job-z0" in res["wall"]["steps"]:
            print("\n" + "\n".join(verdict(res)))
        if args.profile:
            start = args.warmup + args.rounds * args.block
            profile({k: fns[k] for k in ("bare", "job-z0") if k in fns}, list(range(start, start + 10)), top=12)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nload avg at the end: {load}; wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
