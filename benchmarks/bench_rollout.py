"""What on-policy distillation costs: an on-policy step vs an offline step of the job, and generation tokens/s.

    python -m benchmarks.bench_rollout                       # demo sizes, random-init pair (~3 min here)
    python -m benchmarks.bench_rollout --teacher DIR --student DIR   # e.g. the demo's prep teacher + SFT warm start
    python -m benchmarks.bench_rollout --quick               # a smoke run (~30 s)

Part 1, the step. Three cells of the job (`distill.train.prepare.setup`, experiment=demo: toy GPT-2 teacher 4L/128d,
student 2L/64d, micro batch 32, fkl at tau 1), each stepped with the job's own `sample_batches` + `train_step`:
  offline-live   the references, teacher run live on every micro-batch
  offline-cache  the references, teacher outputs from the shared cache (what the demo's cells do)
  on_policy      rollout=on_policy lmbda=1: every micro-batch's responses are sampled from the student
                 (batched, left-padded, KV cache, stop at EOS), then scored by the live teacher
Every variant steps through the same step indices (the job's sampler is a pure function of the step). Rounds of one
step per variant in a freshly shuffled order; seconds/step is the median over rounds, ratios are given as ratio of
medians and as the median of per-round ratios (same step, same minute of load), on wall and process-CPU clocks.
For on_policy the step is split into generation (`sample_batches`, i.e. the rollout) and the rest (`train_step`).

Part 2, generation alone (the student, the same prompts and seed, one micro-batch of prompts):
  batched+kv     the rollout's sampler: one left-padded batch, KV cache on (what on_policy does)
  batched-nokv   the same with use_cache=False (every new token re-runs the whole prefix)
  single+kv      one prompt at a time, KV cache on
tokens/s = generated response tokens (EOS included, nothing after it) / seconds, medians over rounds.

Nothing is asserted: the numbers are for a person to read (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

VARIANTS = ("offline-live", "offline-cache", "on_policy")


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _compose(overrides: list[str]):
    from distill.config import compose

    return compose(overrides)


def build_cells(root: Path, teacher: str | None, student: str | None, extra: list[str]) -> dict:
    """The three cells of part 1 (one process, one engine each), built by the job's own `setup`."""
    from distill.train.prepare import setup

    base = ["experiment=demo", "logger=none", "divergence=fkl", "tau=1.0", f"paths.root={root}",
            "trainer.progress=false", "trainer.eval_every=0", "trainer.ckpt_every=0"]
    if teacher:
        base.append(f"model.teacher.path={teacher}")
    else:
        base += ["model.teacher.allow_random=true"]
    if student:
        base.append(f"model.student.path={student}")
    variants = {
        "offline-live": ["loss.teacher_cache=false"],
        "offline-cache": ["loss.teacher_cache=true"] if teacher else None,  # the cache is keyed by the teacher's files
        "on_policy": ["loss.teacher_cache=false", "rollout=on_policy", "rollout.lmbda=1.0"],
    }
    cells = {}
    for name, over in variants.items():
        if over is None:
            continue
        cells[name] = setup(_compose(base + over + [f"sweep_name=bench-{name}"] + extra))
    return cells


def time_steps(cells: dict, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved, shuffled rounds of one step per variant: wall/CPU of the rollout and of train_step."""
    from distill.train.step import sample_batches, train_step

    out = {v: {"wall": [], "cpu": [], "gen_wall": [], "gen_cpu": [], "gen_tokens": []} for v in cells}
    rng = random.Random(0)
    for r in range(warmup + rounds):
        order = list(cells)
        rng.shuffle(order)
        for name in order:
            cell = cells[name]
            step = r  # every variant steps through the same indices
            before = cell.rollout.generated_tokens
            w0, c0 = _clocks()
            batches = sample_batches(cell, step)
            w1, c1 = _clocks()
            train_step(cell, step, batches)
            w2, c2 = _clocks()
            if r >= warmup:
                rec = out[name]
                rec["wall"].append(w2 - w0)
                rec["cpu"].append(c2 - c0)
                rec["gen_wall"].append(w1 - w0)
                rec["gen_cpu"].append(c1 - c0)
                rec["gen_tokens"].append(cell.rollout.generated_tokens - before)
    return out


def time_generation(student: torch.nn.Module, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_length: int,
                    rounds: int) -> dict[str, dict[str, list[float]]]:
    """Part 2: tokens/s of the rollout's sampler vs no KV cache vs one prompt at a time (same seed each time)."""
    from distill.rollouts.sampling import sample_examples

    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": None, "no_repeat_ngram_size": 0}
    original = student.generate

    def no_cache(*args, **kwargs):
        kwargs["use_cache"] = False
        return original(*args, **kwargs)

    def run(variant: str) -> int:
        student.generate = no_cache if variant == "batched-nokv" else original
        kw = dict(sampling=sampling, seed=11, pad_id=pad_id, eos_id=eos_id, max_length=max_length)
        if variant == "single+kv":
            made = [e for p in prompts for e in sample_examples(student, [p], **kw)]
        else:
            made = sample_examples(student, prompts, **kw)
        return sum(len(e["input_ids"]) - e["prompt_length"] for e in made)

    names = ("batched+kv", "batched-nokv", "single+kv")
    out = {n: {"wall": [], "cpu": [], "tokens": []} for n in names}
    rng = random.Random(1)
    try:
        for _ in range(rounds):
            order = list(names)
            rng.shuffle(order)
            for n in order:
                w0, c0 = _clocks()
                tokens = run(n)
                w1, c1 = _clocks()
                out[n]["wall"].append(w1 - w0)
                out[n]["cpu"].append(c1 - c0)
                out[n]["tokens"].append(tokens)
    finally:
        student.generate = original
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _per_round(a: list[float], b: list[float]) -> str:
    ratios = sorted(x / y for x, y in zip(a, b) if y > 0)
    if not ratios:
        return "–"
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
    return f"{statistics.median(ratios):.2f} [{q(0.25):.2f}, {q(0.75):.2f}]"


def report(steps: dict, gen: dict, header: str) -> str:
    lines = [header, "", "**Part 1: one training step** (seconds/step, medians; ratios vs offline-live)", "",
             "| variant | wall s/step | wall / offline | per-round wall ratio: median [25%, 75%] | CPU s/step | "
             "CPU / offline | generation share of wall | generated tokens/step | generation tokens/s (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = steps["offline-live"]
    for name, rec in steps.items():
        gen_tok = _med(rec["gen_tokens"])
        tps = sum(rec["gen_tokens"]) / max(sum(rec["gen_wall"]), 1e-9) if gen_tok else float("nan")
        share = _med([g / w for g, w in zip(rec["gen_wall"], rec["wall"])]) if gen_tok else 0.0
        lines.append(f"| {name} | {_med(rec['wall']):.3f} | {_med(rec['wall']) / _med(ref['wall']):.2f} | "
                     f"{_per_round(rec['wall'], ref['wall'])} | {_med(rec['cpu']):.3f} | "
                     f"{_med(rec['cpu']) / _med(ref['cpu']):.2f} | {share:.0%} | {gen_tok:.0f} | "
                     + ("–" if tps != tps else f"{tps:,.0f}") + " |")
    lines += ["", "**Part 2: generation alone** (the student, one micro-batch of prompts, same seed; medians)", "",
              "| sampler | wall s | tokens | tokens/s (wall) | tokens/s (CPU) | speed vs batched+kv (wall) |",
              "|---|---:|---:|---:|---:|---:|"]
    base = gen["batched+kv"]
    base_tps = _med([t / w for t, w in zip(base["tokens"], base["wall"])])
    for name, rec in gen.items():
        tps = _med([t / w for t, w in zip(rec["tokens"], rec["wall"])])
        cps = _med([t / c for t, c in zip(rec["tokens"], rec["cpu"])])
        lines.append(f"| {name} | {_med(rec['wall']):.3f} | {_med(rec['tokens']):.0f} | {tps:,.0f} | {cps:,.0f} | "
                     f"{tps / base_tps:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", help="a trained teacher dir (default: a random-init toy teacher; no cache variant)")
    p.add_argument("--student", help="a student dir (default: random init, whose samples rarely stop before max length)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1, like the demo's cells)")
    p.add_argument("--quick", action="store_true", help="4 rounds, 1 warm-up, 2 generation rounds")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.gen_rounds = 4, 1, 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from distill.rollouts.rollout import prompt_of

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        cells = build_cells(Path(tmp), args.teacher, args.student, [f"trainer.num_threads={args.threads}",
                                                                      *args.overrides])
        steps = time_steps(cells, args.rounds, args.warmup)
        cell = cells["on_policy"]
        mbs = int(cell.cfg.trainer.micro_batch_size)
        prompts = [prompt_of(e) for e in cell.train_examples[:mbs]]
        gen = time_generation(cell.engine.module, prompts, pad_id=cell.tokenizer.pad_token_id,
                              eos_id=cell.tokenizer.eos_token_id, max_length=int(cell.cfg.data.max_length),
                              rounds=args.gen_rounds)
    load = os.getloadavg()
    header = (f"**bench_rollout** ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): "
              f"`python -m benchmarks.bench_rollout {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, torch {torch.__version__} ({args.threads} threads); "
              f"teacher {args.teacher or 'random init'}, student {args.student or 'random init'}; "
              f"{args.rounds} rounds after {args.warmup} warm-up, micro batch {mbs}, "
              f"max_length {cell.cfg.data.max_length}")
    print(report(steps, gen, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
