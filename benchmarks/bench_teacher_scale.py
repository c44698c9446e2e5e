"""The teacher at real scale: GPT-2 XL's output head (hidden 1600, vocabulary 50257), body shortened to fit a CPU.

    python -m benchmarks.bench_teacher_scale                   # all three parts: ~15 min on 2 shared cores
    python -m benchmarks.bench_teacher_scale --quick           # a smoke run (~4 min)
    python -m benchmarks.bench_teacher_scale --part storage    # or time, memory; several: --part storage,time

Models (random init: sizes, times and memory do not depend on the weights): the teacher is GPT-2 XL's geometry
(n_embd 1600, 25 heads, 4 x 1600 MLP, vocabulary 50257, tied head) with --teacher-layers of its 48 blocks; the
student is GPT-2's geometry (n_embd 768, 12 heads) with --student-layers of its 12 blocks. Data: random token
sequences of --seq tokens whose first --prompt tokens are the prompt (labels -100), so every other position is a
response position. fp32, torch on 1 thread per process, CPU.

(1) storage. Bytes per response position of each cache form (`distill.teachers.cache.bytes_per_position`): hidden
    states in bf16 and fp32, full float32 log-probs, top-k; as GB per 1M positions at GPT-2 XL and Qwen2.5-7B
    (hidden 3584, vocabulary 152064), and for Dolly (--dolly-positions response positions, an estimate: the
    dataset is not on this machine). The formulas are checked against caches built here by
    `TeacherCache.build_or_load` at GPT-2 XL's sizes: their shard files' bytes per cached position.
(2) time. One optimizer step of the job's fused path (`distill.train.objective.fused_batch_loss`: student forward, fused
    loss with the teacher's head making its logits chunk by chunk, backward, step) on a ZeRO-0 DeepSpeed engine,
    micro-batch --batch x --seq, with the teacher's final hidden states either read from the hidden-state cache
    or computed by a live teacher of each of --live-layers blocks. Variants are interleaved one step at a time in
    a shuffled order per round (after --warmup discarded rounds), each with its own student from the same seed on
    the same batches; medians of --rounds steps. The teacher forward's cost per block is the slope between the
    two live teachers' forward segments; the live step of the full 48-block teacher is projected from it as
    live(a blocks) + (48 - a) x per-block cost, and compared with the cached step.
(3) memory. Peak memory of one step of the job's micro-batch path (`distill.train.objective.micro_batch_loss`, reading the
    hidden-state cache) at each ZeRO stage, 2 processes under torchrun (ZeRO partitions across ranks; with one
    rank every stage holds everything): the fused loss at stages 0-3, the fused loss at stage 3 with the teacher
    partitioned too (model.teacher.shard), and the plain loss at stage 0 for reference. Per rank: resident memory
    after setup (weights, teacher, cache handles), and the peak during two steps (the first allocates Adam's
    state) above it, from /proc/self/status (VmHWM reset through /proc/self/clear_refs). Each configuration runs
    in its own pair of processes.
There are no timed assertions: numbers for a person to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import bench_train as bt
from benchmarks.bench_losses import reset_peak, status_kib
from distill.config import compose

ROOT = Path(__file__).resolve().parents[1]
GPT2_XL = {"hidden": 1600, "vocab": 50257, "layers": 48, "heads": 25}
QWEN_7B = {"hidden": 3584, "vocab": 152064}
GPT2 = {"hidden": 768, "heads": 12}
PAD = 50256  # GPT-2's <|endoftext|>, its usual pad


# ----------------------------------------------------------------------------------------------------------
# models and data


def gpt2(n_embd: int, n_head: int, layers: int, seq: int, seed: int):
    """A GPT-2 of this width and depth on GPT-2's vocabulary (no dropout, single-op tanh GELU, like the toys)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=n_embd, n_head=n_head, vocab_size=GPT2_XL["vocab"],
                                       n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       activation_function="gelu_pytorch_tanh"))
    model.config.use_cache = False
    return model


def teacher_model(layers: int, seq: int):
    return gpt2(GPT2_XL["hidden"], GPT2_XL["heads"], layers, seq, seed=1).requires_grad_(False).eval()


def student_model(layers: int, seq: int):
    return gpt2(GPT2["hidden"], GPT2["heads"], layers, seq, seed=0)


def examples(n: int, seq: int, prompt: int, seed: int = 0) -> list[dict]:
    """Random token sequences: `prompt` prompt tokens (labels -100), then the response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, GPT2_XL["vocab"] - 1, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def job_cfg(args, extra: list[str] = ()):
    """The job's config for the loss and the engine: fkl at tau 2, fused, ZeRO-0, fp32, this micro-batch."""
    return compose(["experiment=smoke", "logger=none", "divergence=fkl", "tau=2", "loss.impl=fused",
                    f"loss.chunk_size={args.chunk_size}", f"trainer.micro_batch_size={args.batch}",
                    "trainer.warmup_steps=0", *extra])


def build_cache(teacher, teacher_dir: Path, exs: list[dict], cache_dir: Path, kind: str, dtype=torch.float32,
                topk=None):
    from distill.teachers.cache import TeacherCache

    return TeacherCache.build_or_load(cache_dir, teacher.to(dtype), teacher_dir, exs, pad_id=PAD, batch_size=2,
                                      kind=kind, topk=topk, device=torch.device("cpu"), dtype=dtype, progress=False)


# ----------------------------------------------------------------------------------------------------------
# (1) storage


def storage(args, tmp: Path) -> list[str]:
    from distill.teachers.cache import bytes_per_position

    forms = [("hidden", "bf16", torch.bfloat16, None), ("hidden", "fp32", torch.float32, None),
             ("logits", "fp32", torch.float32, None), *[("topk", f"k={k}", torch.float32, k) for k in args.ks]]

    def per_pos(kind, dtype, k, dims):
        return bytes_per_position(kind, hidden_size=dims["hidden"], vocab_size=dims["vocab"], dtype=dtype, topk=k)

    lines = ["| form | bytes/position GPT-2 XL | GB per 1M positions GPT-2 XL | x hidden bf16 | bytes/position "
             "Qwen2.5-7B | GB per 1M positions Qwen2.5-7B | x hidden bf16 | exact? |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for kind, label, dtype, k in forms:
        a, b = per_pos(kind, dtype, k, GPT2_XL), per_pos(kind, dtype, k, QWEN_7B)
        a0, b0 = per_pos("hidden", torch.bfloat16, None, GPT2_XL), per_pos("hidden", torch.bfloat16, None, QWEN_7B)
        lines.append(f"| {kind} {label} | {a:,} | {a * 1e6 / 1e9:,.2f} | {a / a0:.2f} | {b:,} | {b * 1e6 / 1e9:,.2f} | "
                     f"{b / b0:.2f} | {'approximate' if kind == 'topk' else 'exact'} |")
    n = args.dolly_positions
    lines += ["", f"Dolly ({n / 1e6:.2f}M response positions, the estimate above):", "",
              "| form | GPT-2 XL GB | Qwen2.5-7B GB |", "|---|---:|---:|"]
    for kind, label, dtype, k in forms:
        lines.append(f"| {kind} {label} | {per_pos(kind, dtype, k, GPT2_XL) * n / 1e9:,.1f} | "
                     f"{per_pos(kind, dtype, k, QWEN_7B) * n / 1e9:,.1f} |")

    # Measured: caches built at GPT-2 XL's sizes (a 1-block teacher: the bytes do not depend on the depth).
    teacher = teacher_model(1, args.seq)
    tdir = tmp / "teacher-storage"
    teacher.save_pretrained(tdir)
    exs = examples(args.storage_examples, args.seq, args.prompt, seed=7)
    lines += ["", f"measured: `TeacherCache.build_or_load` at GPT-2 XL's sizes on {len(exs)} examples "
                  f"({len(exs) * (args.seq - args.prompt)} response positions), bytes on disk per cached position "
                  "(shard files: values + offsets + safetensors header):", "",
              "| form | formula B/position | measured B/position | build s (wall) |", "|---|---:|---:|---:|"]
    for kind, label, dtype, k in forms:
        t = time.perf_counter()
        cache = build_cache(teacher, tdir, exs, tmp / f"cache-{kind}-{label}", kind, dtype, k)
        wall = time.perf_counter() - t
        lines.append(f"| {kind} {label} | {per_pos(kind, dtype, k, GPT2_XL):,} | {cache.nbytes / cache.positions:,.0f} "
                     f"| {wall:.1f} |")
        cache.close()
    return lines


# ----------------------------------------------------------------------------------------------------------
# (2) time


def step_time(args, tmp: Path) -> list[str]:
    from distill.train import engine as eng
    from distill import models
    from distill.data.encoding import collate_train, response_mask
    from distill.train.objective import fused_batch_loss

    cfg = job_cfg(args)
    a, b = args.live_layers
    n_steps = args.warmup + args.rounds
    exs = examples(n_steps * args.batch, args.seq, args.prompt, seed=1)
    teachers = {layers: teacher_model(layers, args.seq) for layers in (a, b)}
    tdir = tmp / f"teacher-L{a}"
    teachers[a].save_pretrained(tdir)
    t0 = time.perf_counter()
    cache = build_cache(teachers[a], tdir, exs, tmp / "cache-time", "hidden")
    build_s = time.perf_counter() - t0

    def make(source):
        engine = eng.initialize(student_model(args.student_layers, args.seq), cfg.trainer, 1)
        engine.train()
        teacher = teachers[a if source == "cache" else source]

        def step(s: int) -> bt.Clock:
            clock = bt.Clock()
            ids = list(range(s * args.batch, (s + 1) * args.batch))
            batch = collate_train([exs[i] for i in ids], PAD)
            num_tokens = float(response_mask(batch["labels"]).sum())
            clock.lap("data")
            if source == "cache":
                t_hidden = cache.batch_hidden(ids, batch["labels"])
            else:
                with torch.no_grad():
                    t_hidden = models.final_hidden(teacher, batch["input_ids"], batch["attention_mask"])
            clock.lap("forward")  # the teacher's part: its forward, or reading its cached hidden states
            loss, _ = fused_batch_loss(cfg, engine, teacher, batch, num_tokens, t_hidden)
            clock.lap("loss")      # student forward + fused loss (the teacher's head makes its logits here)
            engine.backward(loss)
            clock.lap("backward")
            engine.step()
            clock.loss = loss.item()
            clock.lap("step")
            return clock

        return step

    names = {"cache": "cache", a: f"live {a} block{'s' * (a > 1)}", b: f"live {b} blocks"}
    fns = {names[v]: make(v) for v in ("cache", a, b)}
    res = bt.interleave(fns, warmup=args.warmup, rounds=args.rounds, block=1, seed=3)

    def med(name, clock, segment=None):
        if segment is None:
            return statistics.median(res[clock]["steps"][name])
        return statistics.median(res[clock]["segments"][name][segment])

    n_params = {k: models.count_params(t) for k, t in teachers.items()}
    lines = [f"teacher: GPT-2 XL blocks (n_embd 1600, 25 heads) x {a} and x {b}, vocabulary 50257 "
             f"({n_params[a] / 1e6:.0f}M / {n_params[b] / 1e6:.0f}M params); student: GPT-2 blocks (n_embd 768) x "
             f"{args.student_layers} ({models.count_params(student_model(args.student_layers, args.seq)) / 1e6:.0f}M "
             f"params); micro-batch {args.batch} x {args.seq} tokens ({args.batch * (args.seq - args.prompt - 1)} "
             f"scored positions), fkl tau 2, fused loss chunk {args.chunk_size}, ZeRO-0 fp32; {args.warmup} warm-up + "
             f"{args.rounds} measured rounds, 1 step per variant per round, shuffled", "",
             f"hidden-state cache of the {a}-block teacher: built once in {build_s:.1f} s wall "
             f"({len(exs)} examples, {cache.nbytes / 2**20:.0f} MiB)", "",
             "first-step loss (cache and the live teacher it was built from must agree): "
             + ", ".join(f"{k} {v:.6f}" for k, v in res["first_loss"].items()), "",
             "| variant | wall s/step | CPU s/step | teacher part, CPU s (forward or cache read) | rest of the step, CPU s |",
             "|---|---:|---:|---:|---:|"]
    for name in fns:
        t_part = med(name, "cpu", "forward")
        lines.append(f"| {name} | {med(name, 'wall'):.3f} | {med(name, 'cpu'):.3f} | {t_part:.3f} | "
                     f"{med(name, 'cpu') - t_part:.3f} |")
    lines += ["", *bt.segment_table(res, "cpu")]
    out = []
    for clock in ("cpu", "wall"):
        per_block = (med(names[b], clock, "forward") - med(names[a], clock, "forward")) / (b - a)
        live_full = med(names[a], clock) + (GPT2_XL["layers"] - a) * per_block
        cached = med("cache", clock)
        out.append(f"| {clock} | {per_block:.3f} | {live_full:.2f} | {cached:.3f} | {live_full / cached:.1f}x | "
                   f"{1 - cached / live_full:.1%} |")
    lines += ["", f"projected to the full {GPT2_XL['layers']}-block teacher (live step = live {a} block(s) + "
                  f"{GPT2_XL['layers'] - a} x the measured per-block forward cost):", "",
              "| clock | teacher forward per block, s | live step, full teacher, s | cached step, s | live / cached "
              "| saving |", "|---|---:|---:|---:|---:|---:|", *out]
    cache.close()
    return lines


# ----------------------------------------------------------------------------------------------------------
# (3) memory, one configuration per pair of processes


def memory_worker(args) -> None:
    """Under torchrun: one configuration (--stage, --impl, --shard); each rank writes its numbers to --out."""
    import contextlib

    from distill.train import engine as eng
    from distill import models
    from distill.data.encoding import collate_train
    from distill.teachers.cache import TeacherCache
    from distill.data.encoding import response_mask
    from distill.train.objective import EXAMPLE_IDS, micro_batch_loss

    rank, world = eng.setup_distributed(600)
    torch.set_num_threads(1)
    cfg = job_cfg(args, [f"loss.impl={args.impl}", f"trainer.zero_stage={args.stage}"])
    tdir = Path(args.teacher_dir)
    exs = examples(args.mem_examples, args.seq, args.prompt, seed=2)
    if args.shard:
        with eng.zero3_loading(eng.frozen_zero3_config(cfg.trainer)):
            teacher = models.load_model(tdir, torch.float32)
        teacher_engine = eng.shard_frozen(teacher, cfg.trainer)
        teacher = teacher_engine.module
    else:
        teacher = models.load_model(tdir, torch.float32).requires_grad_(False).eval()
    cache = TeacherCache.build_or_load(Path(args.cache_dir), teacher, tdir, exs, pad_id=PAD, batch_size=2,
                                       kind="hidden", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    engine = eng.initialize(student_model(args.student_layers, args.seq), cfg.trainer, world)
    engine.train()
    cell = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), cache=cache, engine=engine, teacher=teacher)
    setup_kib = status_kib("VmRSS")
    reset_peak()  # VmHWM back to the current RSS
    for step in range(2):
        ids = [(step * world + rank) * args.batch + i for i in range(args.batch)]
        batch = collate_train([exs[i] for i in ids], PAD)
        local = float(response_mask(batch["labels"]).sum())
        loss, _ = micro_batch_loss(cell, {**batch, EXAMPLE_IDS: torch.tensor(ids)}, local * world)
        engine.backward(loss * world)
        engine.step()
    out = {"rank": rank, "setup_mib": setup_kib / 1024, "peak_mib": status_kib("VmHWM") / 1024,
           "after_mib": status_kib("VmRSS") / 1024, "loss": loss.item()}
    Path(args.out).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    with contextlib.suppress(Exception):
        cache.close()


def memory(args, tmp: Path) -> list[str]:
    teacher = teacher_model(1, args.seq)
    tdir = tmp / "teacher-memory"
    teacher.save_pretrained(tdir)
    cache_dir = tmp / "cache-memory"
    build_cache(teacher, tdir, examples(args.mem_examples, args.seq, args.prompt, seed=2), cache_dir, "hidden")
    del teacher
    configs = [("fused", s, False) for s in args.stages] + [("fused", 3, True), ("plain", 0, False)]
    if args.quick:
        configs = [("fused", 0, False), ("fused", 3, True)]
    rows = []
    for impl, stage, shard in configs:
        out = tmp / f"mem-{impl}-z{stage}-{int(shard)}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "benchmarks.bench_teacher_scale", "--worker", "memory", "--impl", impl, "--stage", str(stage),
               "--teacher-dir", str(tdir), "--cache-dir", str(cache_dir), "--out", str(out), *args.passthrough]
        if shard:
            cmd.append("--shard")
        env = {k: v for k, v in os.environ.items()  # torchrun sets the ranks; drop this process's own
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            rows.append(f"| {impl} | {stage} | {'sharded' if shard else 'replicated'} | failed: "
                        f"{proc.stderr.strip().splitlines()[-1][:120] if proc.stderr.strip() else proc.returncode} | | | |")
            continue
        ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in (0, 1)]
        setup_mib = max(r["setup_mib"] for r in ranks)
        extra = max(r["peak_mib"] - r["setup_mib"] for r in ranks)
        rows.append(f"| {impl} | {stage} | {'sharded' if shard else 'replicated'} | {setup_mib:,.0f} | {extra:,.0f} | "
                    f"{max(r['peak_mib'] for r in ranks):,.0f} | {ranks[0]['loss']:.6f} |")
    seq_pos = args.batch * (args.seq - args.prompt - 1)
    return [f"student: GPT-2 blocks x {args.student_layers} + head (vocabulary 50257); teacher: 1 GPT-2 XL block + "
            f"head, its final hidden states read from the cache; micro-batch {args.batch} x {args.seq} per rank "
            f"({seq_pos} scored positions), 2 ranks, fp32, AdamW; the max over the 2 ranks", "",
            "| loss | ZeRO stage | teacher | RSS after setup, MiB | step peak above it, MiB | peak RSS, MiB | "
            "loss of step 2 (rank 0) |", "|---|---:|---|---:|---:|---:|---:|", *rows]


# ----------------------------------------------------------------------------------------------------------
# main


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short sequences, 2 rounds, 2 memory configs")
    p.add_argument("--part", default="storage,time,memory", help="any of storage,time,memory (default all)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per sequence (default 32)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank (default 2)")
    p.add_argument("--chunk-size", type=int, default=256, help="fused loss chunk (default 256, the job's)")
    p.add_argument("--student-layers", type=int, default=2, help="GPT-2 blocks in the student (default 2)")
    p.add_argument("--live-layers", type=ints, default=[1, 3], help="(2) two live teacher depths (default 1,3)")
    p.add_argument("--warmup", type=int, default=2, help="(2) discarded rounds (default 2)")
    p.add_argument("--rounds", type=int, default=8, help="(2) measured rounds (default 8)")
    p.add_argument("--ks", type=ints, default=[8, 32, 128], help="(1) top-k sizes (default 8,32,128)")
    p.add_argument("--storage-examples", type=int, default=8, help="(1) examples in the measured caches (default 8)")
    p.add_argument("--dolly-positions", type=float, default=1.5e6,
                   help="(1) response positions in Dolly's training set (default 1.5e6, an estimate)")
    p.add_argument("--stages", type=ints, default=[0, 1, 2, 3], help="(3) ZeRO stages (default 0,1,2,3)")
    p.add_argument("--mem-examples", type=int, default=8, help="(3) examples in the cache (default 8)")
    # internal: the memory worker under torchrun
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--teacher-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.prompt, args.rounds, args.warmup, args.live_layers = 64, 16, 2, 1, [1, 2]
        args.ks, args.storage_examples = [32], 4
    # what a worker needs to rebuild the same models and data
    args.passthrough = [f"--seq={args.seq}", f"--prompt={args.prompt}", f"--batch={args.batch}",
                        f"--chunk-size={args.chunk_size}", f"--student-layers={args.student_layers}",
                        f"--mem-examples={args.mem_examples}"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    bt.quiet()
    if args.worker == "memory":
        memory_worker(args)
        return 0
    from distill.train import engine as eng

    parts = [x.strip() for x in args.part.split(",") if x.strip()]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_teacher_scale_") as tmp_name:
        tmp = Path(tmp_name)
        print(f"# bench_teacher_scale ({time.strftime('%Y-%m-%d %H:%M')})\n")
        eng.setup_distributed(600)
        print(f"machine: {bt.machine_line()}\n")
        if "storage" in parts:
            print("## (1) storage per response position\n")
            print("\n".join(storage(args, tmp)) + "\n")
        if "time" in parts:
            print("## (2) step time: hidden-state cache vs live teacher\n")
            print("\n".join(step_time(args, tmp)) + "\n")
        if "memory" in parts:
            print("## (3) peak memory of a step per ZeRO stage\n")
            print("\n".join(memory(args, tmp)) + "\n")
    print(f"load avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
