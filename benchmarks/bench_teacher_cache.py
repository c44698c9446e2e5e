"""The teacher cache: what a tau grid costs with and without it, and what its top-k form gives up.

    python -m benchmarks.bench_teacher_cache                       # both parts, demo sizes: ~3 min on 2 shared cores
    python -m benchmarks.bench_teacher_cache --quick               # a smoke run (~1.5 min)
    python -m benchmarks.bench_teacher_cache --part b --teacher outputs/demo-prep/<teacher cell>/student \\
        --student outputs/demo-prep/<warm start cell>/student      # part (b) on the demo's trained models

Models and data: the demo's sizes (conf/experiment/demo.yaml: teacher GPT-2 4L/128d, student 2L/64d, embedded suite,
template alpaca_compact, micro batch 32, vocab 512, 4000 training examples). Unless --teacher/--student name trained
HF dirs, the script trains both itself first with a plain PyTorch SFT loop on the job's batches (--teacher-steps,
--student-steps; AdamW, lr 2e-3, warmup + cosine): enough to make the teacher's distributions peaked like a real
teacher's, far from the demo's 800-step teacher. Which models were used is printed. The teacher is saved with
`save_pretrained` to a tmp dir, because the cache is keyed by `model.teacher.path`.

(a) Grid cost. A G-cell grid (fkl at --taus, every cell --steps-per-cell optimizer steps) costs, per variant:
      student-only  every cell is SFT (loss.kd_ratio=0, no teacher at all): the floor a distillation grid can reach.
      live teacher  every cell loads the teacher and runs its forward at every step (loss.teacher_cache=false).
      cache         the cache is computed ONCE, then every cell loads the teacher (the job still does, for
                    validation) and the cache file, and reads its batches from the cache (loss.teacher_cache =
                    --cache-kind: by default `auto`, the job's choice, here the teacher's final hidden states, to
                    which the teacher's head is applied at each step; `logits` = the full log-probs).
    Every cell is the job's own: `distill.train.prepare.setup` (data, tokenizer, teacher or cache, DeepSpeed engine
    with ZeRO-0, fp32, world size 1) and `distill.train.step.train_step` (through `bench_train.job_step`), so the
    costs are the job's. Within each cell the three variants step through the same batches, interleaved one step at
    a time in a shuffled order per round (after --warmup discarded steps each), and a variant's cell cost = steps x
    median seconds/step + its per-cell fixed cost, the time of its `setup` (which differs between the variants by
    the teacher and cache loads). Validation, export and evaluation are the same for every variant and left out.
    The one-time build is timed through the job's own path too: before the grid, one cache cell is set up alone,
    and its `setup` finds no cache and builds it (`distill.teachers.source.teacher_cache`:
    `TeacherCache.build_or_load`); the grid's cache cells then load it. The build's cost is that setup's time minus
    the mean setup time of the grid's cache cells (which do everything else it did).
    Printed: each grid's cost and its ratio to the student-only grid, in wall and process-CPU seconds (CPU time is
    nearly blind to other users of a shared machine), plus the same projected to the demo sweep (18 cells x 150 steps)
    from the measured per-step and fixed costs. Target (the Performance issue): cache grid <= 1.2x student-only.

(b) Top-k approximation. On the first --topk-examples training examples, the teacher's tau=1 log-probs at every
    response position are computed by `distill.teachers.cache.compute` exactly (topk=None) and as top-k for each k,
    and the top-k rows are rebuilt by `rebuild_topk` (top-k exact, the remaining mass spread uniformly), i.e.
    exactly what a cell would train on. For fkl, rkl and jsd at each tau, the distillation loss
    (`distill.losses.divergences.distillation_loss`, tau^2 on, mean over positions) of the student's logits against the exact
    and the rebuilt teacher gives |L_k - L| / L, and the gradient w.r.t. the student's logits gives
    ||g_k - g|| / ||g||. Separately, the teacher's tau-softened mass outside its top-k, mean and 95th percentile over
    positions: the non-dominant signal that top-k flattens, which grows with tau.
There are no timed assertions: numbers for a person to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks import bench_train as bt
from distill.config import compose

TARGET = 1.2
DEMO_SWEEP = (18, 150)  # sweeps/demo.yaml: 2 divergences x 3 taus x 3 seeds; experiment=demo: 150 steps


def timed(fn: Callable):
    """(result, wall seconds, process-CPU seconds) of fn()."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


# ----------------------------------------------------------------------------------------------------------
# models


def sft(model, train_ex: list[dict], pad_id: int, steps: int, seed: int) -> float:
    """A plain SFT loop on the job's batches (setup only, not measured); returns the last step's CE."""
    from distill.data.encoding import collate_train
    from distill.train.engine import lr_schedule
    from distill.train.step import sample_indices

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01)
    sched = lr_schedule(opt, max(1, steps // 10), steps, 0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = sample_indices(len(train_ex), step, 0, 0, world=1, micro_bs=32, grad_accum=1, seed=seed)
        loss = model(**collate_train([train_ex[i] for i in idx], pad_id)).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def prepare_models(args, cfg, train_ex, tokenizer, tmp: Path) -> tuple[Path, Path, str]:
    """Teacher and student HF dirs: the given ones, or trained here by SFT and saved; plus a line saying which."""
    from distill import models

    dirs, notes = {}, []
    for role, given, steps, seed in (("teacher", args.teacher, args.teacher_steps, 1),
                                     ("student", args.student, args.student_steps, 2)):
        if given:
            dirs[role] = Path(given)
            notes.append(f"{role}: {given}")
            continue
        model = models.build_model(cfg.model, role, tokenizer, torch.float32, int(cfg.data.max_length), seed=seed)
        if steps > 0:
            (ce, wall, _) = timed(lambda: sft(model, train_ex, tokenizer.pad_token_id, steps, seed))
            notes.append(f"{role}: random init + {steps} SFT steps here (last CE {ce:.3f}, {wall:.0f} s)")
        else:
            notes.append(f"{role}: random init")
        dirs[role] = tmp / role
        model.save_pretrained(dirs[role])
    return dirs["teacher"], dirs["student"], "; ".join(notes)


# ----------------------------------------------------------------------------------------------------------
# (a) grid cost


def grid_cost(args, base: list[str], teacher_dir: Path) -> list[str]:
    """Measure the three grid variants (see the module docstring); return the markdown report lines."""
    from distill.train.prepare import setup

    with_teacher = base + [f"model.teacher.path={teacher_dir}"]
    cache_setting = f"loss.teacher_cache={args.cache_kind}"
    builder, build_wall, build_cpu = timed(lambda: setup(compose(with_teacher + [cache_setting])))
    kind, cache_mb = builder.cache.kind, builder.cache.nbytes / 2**20
    del builder

    variants = ("student-only", "live teacher", "cache")
    steps = args.warmup + args.rounds  # optimizer steps per cell (block of 1 step per round)
    per_step = {v: {"wall": [], "cpu": []} for v in variants}   # one median per cell
    fixed = {v: {"wall": 0.0, "cpu": 0.0} for v in variants}    # summed over cells: the job's `setup`
    extra = {"student-only": ["loss.kd_ratio=0.0"], "live teacher": ["loss.teacher_cache=false"],
             "cache": [cache_setting]}
    first_losses: list[str] = []  # the full cache is exact: live and cache must train on the same loss
    for tau in args.taus:
        fns = {}
        for v in variants:
            cfg = compose(with_teacher + [f"tau={tau}", *extra[v]])
            cell, w, c = timed(lambda: setup(cfg))
            fixed[v]["wall"] += w
            fixed[v]["cpu"] += c
            fns[v] = (lambda cell: lambda s: bt.job_step(cell, s))(cell)
        res = bt.interleave(fns, warmup=args.warmup, rounds=args.rounds, block=1, seed=int(tau * 1000))
        first_losses.append(f"tau={tau:g}: " + ", ".join(f"{k} {v:.6f}" for k, v in res["first_loss"].items()))
        for v in variants:
            for c in ("wall", "cpu"):
                per_step[v][c].append(statistics.median(res[c]["steps"][v]))
        last = res
        del fns, cell

    g = len(args.taus)
    # What building adds to a setup that loads the cache (the grid's cache cells do everything else the builder did).
    build = {"wall": build_wall - fixed["cache"]["wall"] / g, "cpu": build_cpu - fixed["cache"]["cpu"] / g}

    def cost(v: str, clock: str, n_cells: int, n_steps: int) -> float:
        mean_step = statistics.mean(per_step[v][clock])
        fixed_per_cell = fixed[v][clock] / g
        return n_cells * (n_steps * mean_step + fixed_per_cell) + (build[clock] if v == "cache" else 0.0)

    lines = [f"grid: fkl, tau in {args.taus} ({g} cells), {steps} steps per cell ({args.warmup} warm-up + "
             f"{args.rounds} measured, interleaved 1 step at a time); cache: {kind}, {cache_mb:.1f} MB", "",
             f"one-time build: the setup of the cell that built the cache {build_wall:.1f} s wall / {build_cpu:.1f} s "
             f"CPU, of a cell that loads it {fixed['cache']['wall'] / g:.1f} s / {fixed['cache']['cpu'] / g:.1f} s "
             f"(mean): the build adds {build['wall']:.1f} s wall / {build['cpu']:.1f} s CPU", "",
             "| variant | wall s/step | CPU s/step | fixed per cell, wall s | grid wall s | grid / student-only (wall) "
             "| grid CPU s | grid / student-only (CPU) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base_cost = {c: cost("student-only", c, g, steps) for c in ("wall", "cpu")}
    for v in variants:
        w, c = cost(v, "wall", g, steps), cost(v, "cpu", g, steps)
        lines.append(f"| {v}{' (+ build)' if v == 'cache' else ''} | {statistics.mean(per_step[v]['wall']):.4f} | "
                     f"{statistics.mean(per_step[v]['cpu']):.4f} | {fixed[v]['wall'] / g:.2f} | {w:.1f} | "
                     f"{w / base_cost['wall']:.3f} | {c:.1f} | {c / base_cost['cpu']:.3f} |")
    n_cells, n_steps = DEMO_SWEEP
    demo_base = {c: cost("student-only", c, n_cells, n_steps) for c in ("wall", "cpu")}
    lines += ["", f"projected to the demo sweep ({n_cells} cells x {n_steps} steps, same per-step and fixed costs):", "",
              "| variant | grid wall s | / student-only (wall) | grid CPU s | / student-only (CPU) |",
              "|---|---:|---:|---:|---:|"]
    for v in variants:
        w, c = cost(v, "wall", n_cells, n_steps), cost(v, "cpu", n_cells, n_steps)
        lines.append(f"| {v} | {w:.0f} | {w / demo_base['wall']:.3f} | {c:.0f} | {c / demo_base['cpu']:.3f} |")
    # Total steps S (at `steps` per cell) from which the cache grid is within TARGET of student-only, each step
    # carrying its share of its cell's setup (f_c, f_s):
    # build + S * (c + f_c / steps) = TARGET * S * (s + f_s / steps)  =>  S = build / margin.
    c_step, s_step = statistics.mean(per_step["cache"]["cpu"]), statistics.mean(per_step["student-only"]["cpu"])
    margin = (TARGET * (s_step + fixed["student-only"]["cpu"] / g / steps)
              - c_step - fixed["cache"]["cpu"] / g / steps)
    lines += ["", f"break-even (CPU): the cache grid is within {TARGET}x of student-only "
                  + (f"from about {build['cpu'] / margin:,.0f} total optimizer steps ({build['cpu'] / margin / steps:.0f} "
                     f"cells of {steps} steps)"
                     if margin > 0 else f"never at {steps} steps per cell: a cached step with its share of the cell's "
                     f"setup costs more than {TARGET} student-only ones")]
    l_step = statistics.mean(per_step["live teacher"]["cpu"])
    gain = l_step + fixed["live teacher"]["cpu"] / g / steps - c_step - fixed["cache"]["cpu"] / g / steps
    if gain > 0:
        lines.append(f"break-even (CPU) against the live teacher: the cache grid is cheaper from about "
                     f"{build['cpu'] / gain:,.0f} total optimizer steps")
    r = cost("cache", "cpu", g, steps) / base_cost["cpu"]
    rw = cost("cache", "wall", g, steps) / base_cost["wall"]
    lines += ["", f"target cache grid / student-only <= {TARGET}: CPU {r:.3f} ({'met' if r <= TARGET else 'NOT met'}), "
                  f"wall {rw:.3f} ({'met' if rw <= TARGET else 'NOT met'}) on this {g}-cell grid"]
    lines += ["", "loss of each cell's first step (student-only is CE; live teacher and cache must agree):", "",
              *[f"- {x}" for x in first_losses]]
    lines += ["", f"per-step segments of the last cell (tau={args.taus[-1]:g}), median process-CPU ms ('forward' holds "
                  "the teacher forward or the cache read; 'loss' is batch_loss):", "", *bt.segment_table(last, "cpu")]
    return lines


# ----------------------------------------------------------------------------------------------------------
# (b) top-k approximation


@torch.no_grad()
def student_rows(student, examples: list[dict], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Student logits at the teacher cache's positions, in the cache's row order (example, then position)."""
    from distill.data.encoding import collate_train
    from distill.teachers.cache import response_positions

    rows = []
    for start in range(0, len(examples), batch_size):
        batch = collate_train(examples[start:start + batch_size], pad_id)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows.append(logits[response_positions(batch["labels"])].float())
    return torch.cat(rows)


def loss_and_grad(s_rows: torch.Tensor, t_rows: torch.Tensor, divergence: str, tau: float):
    """(loss value, gradient w.r.t. the student logits) of the distillation loss over all rows."""
    from distill.losses.divergences import distillation_loss

    s = s_rows.clone().requires_grad_(True)
    mask = torch.ones(s.shape[0], dtype=torch.bool)
    loss = distillation_loss(s, t_rows, mask, divergence=divergence, tau=tau)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.item(), grad


def topk_error(args, teacher_dir: Path, student_dir: Path, train_ex, tokenizer, device) -> list[str]:
    """Loss/gradient error of the top-k cache vs the exact teacher, and tail mass outside the top-k."""
    from distill import models
    from distill.teachers.cache import compute, rebuild_topk

    pad_id = tokenizer.pad_token_id
    examples = train_ex[: args.topk_examples]
    teacher = models.load_model(teacher_dir, torch.float32).eval().to(device)
    student = models.load_model(student_dir, torch.float32).eval().to(device)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    exact = compute(teacher, examples, pad_id=pad_id, batch_size=32, kind="logits", device=device)["values"]
    s_rows = student_rows(student, examples, pad_id)
    approx = {}
    for k in args.ks:
        top = compute(teacher, examples, pad_id=pad_id, batch_size=32, kind="topk", topk=k, device=device)
        approx[k] = rebuild_topk(top["values"], top["topk_ids"], top["tail_mass"], vocab)
    if s_rows.shape != exact.shape:
        raise RuntimeError(f"student rows {tuple(s_rows.shape)} != teacher rows {tuple(exact.shape)}")

    p1 = exact.exp()
    entropy = float(-(p1 * exact).sum(-1).mean())
    top1 = float(p1.max(-1).values.mean())
    s_ce = float(-(exact.exp() * torch.log_softmax(s_rows, -1)).sum(-1).mean())
    lines = [f"{len(examples)} training examples, {exact.shape[0]} response positions, vocab {vocab}; teacher at "
             f"tau=1: mean entropy {entropy:.3f} nats, mean top-1 prob {top1:.3f}; student's cross-entropy to the "
             f"teacher {s_ce:.3f} nats", "",
             "relative error of the loss |L_k - L| / L (and of its gradient w.r.t. the student logits, "
             "||g_k - g|| / ||g||), top-k cache vs exact teacher:", ""]
    head = " | ".join(f"k={k} loss | k={k} grad" for k in args.ks)
    lines += [f"| divergence | tau | exact loss | {head} |", "|---|---:|---:|" + "---:|" * (2 * len(args.ks))]
    for div in args.divergences:
        for tau in args.topk_taus:
            loss, grad = loss_and_grad(s_rows, exact, div, tau)
            cells = []
            for k in args.ks:
                lk, gk = loss_and_grad(s_rows, approx[k], div, tau)
                cells.append(f"{abs(lk - loss) / abs(loss):.2e} | {float((gk - grad).norm() / grad.norm()):.2e}")
            lines.append(f"| {div} | {tau:g} | {loss:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "teacher's tau-softened mass outside its top-k, mean [95th percentile] over positions:", "",
              "| tau | " + " | ".join(f"k={k}" for k in args.ks) + " |", "|---:|" + "---:|" * len(args.ks)]
    for tau in args.topk_taus:
        p = torch.softmax(exact / tau, dim=-1)
        cells = []
        for k in args.ks:
            out = 1.0 - p.topk(k, dim=-1).values.sum(-1)
            cells.append(f"{float(out.mean()):.4f} [{float(out.quantile(0.95)):.4f}]")
        lines.append(f"| {tau:g} | " + " | ".join(cells) + " |")
    lines += ["", "cache size per position: full " + f"{vocab * 4} B; " +
              ", ".join(f"top-{k} {k * 8 + 4} B" for k in args.ks) + " (float32 log-probs + int32 ids + tail mass)"]
    return lines


# ----------------------------------------------------------------------------------------------------------
# main


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 cells of 8 steps, short SFT, 64 examples in (b)")
    p.add_argument("--part", choices=("a", "b", "both"), default="both")
    p.add_argument("--taus", type=floats, default=[1.0, 2.0, 4.0], help="(a) the grid's taus (default 1,2,4)")
    p.add_argument("--warmup", type=int, default=3, help="(a) discarded steps per variant and cell (default 3)")
    p.add_argument("--rounds", type=int, default=30, help="(a) measured steps per variant and cell (default 30)")
    p.add_argument("--cache-kind", choices=("auto", "hidden", "logits"), default="auto",
                   help="(a) the cache's form (default auto: the job's choice, hidden states at these sizes)")
    p.add_argument("--ks", type=ints, default=[8, 32, 128], help="(b) top-k sizes (default 8,32,128)")
    p.add_argument("--topk-taus", type=floats, default=[1.0, 2.0, 4.0, 8.0], help="(b) taus (default 1,2,4,8)")
    p.add_argument("--divergences", default="fkl,rkl,jsd", help="(b) divergences (default fkl,rkl,jsd)")
    p.add_argument("--topk-examples", type=int, default=512, help="(b) training examples scored (default 512)")
    p.add_argument("--teacher", default=None, help="a trained teacher HF dir (default: train one here)")
    p.add_argument("--student", default=None, help="(b) a trained student HF dir, e.g. the SFT warm start (default: train one here)")
    p.add_argument("--teacher-steps", type=int, default=300, help="SFT steps of the teacher trained here (default 300)")
    p.add_argument("--student-steps", type=int, default=100, help="SFT steps of the student trained here (default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, like the demo cells)")
    p.add_argument("--data-dir", default=None, help="where the embedded suite is generated/cached (default: a tmp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.taus, args.warmup, args.rounds = args.taus[:2], 2, 6
        args.topk_examples, args.teacher_steps, args.student_steps = 64, 30, 20
    args.divergences = [d.strip() for d in args.divergences.split(",") if d.strip()]
    torch.set_num_threads(args.threads)
    bt.quiet()

    from distill.train.prepare import setup

    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_teacher_cache_") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = Path(args.data_dir) if args.data_dir else tmp / "data"
        base = ["experiment=demo", "logger=none", f"paths.root={tmp}", f"paths.data_dir={data_dir}",
                "model.student.path=null", "divergence=fkl", "trainer.num_threads=null", "trainer.progress=false"]
        # The job's encoded training examples and tokenizer, from a student-only cell: no teacher exists yet.
        data_cell = setup(compose(base + ["loss.kd_ratio=0.0"]))
        cfg, train_ex, tokenizer, device = (data_cell.cfg, data_cell.train_examples, data_cell.tokenizer,
                                            data_cell.device)
        del data_cell
        teacher_dir, student_dir, which = prepare_models(args, cfg, train_ex, tokenizer, tmp)
        print(f"# bench_teacher_cache ({time.strftime('%Y-%m-%d %H:%M')})\n")
        print(f"machine: {bt.machine_line()}")
        print(f"models: {which}\n")
        if args.part in ("a", "both"):
            print("## (a) grid cost with and without the teacher cache, vs student-only\n")
            print("\n".join(grid_cost(args, base, teacher_dir)))
        if args.part in ("b", "both"):
            print("\n## (b) top-k cache vs exact teacher\n")
            print("\n".join(topk_error(args, teacher_dir, student_dir, train_ex, tokenizer, device)))
        print(f"\nload avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
