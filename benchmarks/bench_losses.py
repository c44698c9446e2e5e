"""Time and peak extra memory of the distillation losses at real vocabulary sizes, side by side.

    python -m benchmarks.bench_losses                      # 4096 positions x 50257 vocab, fkl,rkl,jsd
    python -m benchmarks.bench_losses --quick              # small sizes, a smoke run
    python -m benchmarks.bench_losses --vocab 151936 --positions 2048 --objectives fkl,akl --chunk-size 512

Variants (forward + backward of one loss, gradient w.r.t. the student):
  naive    a reference in the style of DistiLLM's losses: fp32 softmax / log_softmax of the full [N, V] tensors,
           probability products and inf masks materialised, masked mean at the end.
  plain    distill.losses.divergences.distillation_loss.
  chunked  distill.losses.chunked.chunked_distillation_loss (chunk_size rows at a time).
  fused    distill.losses.chunked.fused_distillation_loss (from hidden states; never builds [N, V] logits).
Peers (optional: `pip install -e ".[peers]"`; a missing one is reported and skipped):
  torchtune       torchtune.modules.loss.ForwardKLWithChunkedOutputLoss (fkl only; its module loaded by file, see
                  benchmarks/peers.py), fed --tt-chunks chunks of
                  logits as its recipe does (in the hidden section: one output projection per chunk); it has no
                  temperature, so each chunk is divided by tau first. Its value is a cross-entropy (no teacher
                  entropy): converted to ours as (value - H(p_tau)) x tau^2 for the agreement columns.
  liger           liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (hidden section; fkl = beta 0, rkl = beta 1,
                  jsd = beta, TRL's convention), weight_hard_loss=0, chunk_size rows per chunk, compiled=False:
                  its pure-PyTorch chunked path in eager mode. No tau^2: its value is converted as value x tau^2.
  liger-compiled  the same with compiled=True (Liger's default): torch.compile (inductor, C++ on CPU) of its
                  per-chunk function. Its warm-up is one full-size step (the compile, reported as compile_s), so
                  the timed steps are compiled ones.

Two sections, each with its own naive baseline (ratios are against the naive of the same section):
  logits   inputs are student/teacher logits [N, V]; measures the loss alone (naive, plain, chunked).
  hidden   inputs are hidden states [N, H] and output weights [V, H] (student and teacher); measures
           "logits = hidden @ W.T, then the loss" end to end, gradients to the student's hidden states and W
           (naive, plain, chunked, fused). This is the fair comparison for fused.

How memory is measured (CPU): every (section, objective, variant) runs in a fresh subprocess. After the inputs
exist and a small warm-up step ran, the process resets its kernel peak-RSS counter (writing 5 to
/proc/self/clear_refs resets VmHWM) and notes its RSS; after the timed steps it reads VmHWM. "peak extra" =
VmHWM - that RSS: every byte the step touched at its worst moment, including the gradient w.r.t. the student
input (which every variant must produce) and allocator overheads. torch's CPU allocator does not cache, so
freed tensors leave the RSS (the children run with MALLOC_MMAP_THRESHOLD_=1 MiB so that glibc hands every
tensor-sized block back on free); tracemalloc would not see torch's memory at all. Where clear_refs is not
writable the script falls back to ru_maxrss and says so (then the input creation may dominate the peak).
Time is the best of --repeats wall-clock runs (the machine may be shared; min is the least noisy estimate).
Agreement: every variant's loss and its gradient (w.r.t. the student inputs, through a seeded random projection and
its norm) are converted to our convention (true KL, x tau^2) and compared with `plain` of the same section.

Reading the numbers: the chunked/fused peak is about (gradient of the inputs) + k x chunk_size x V x 4 bytes,
with k ~ 6 (fkl, rkl) to ~10 (jsd) float32 chunk-sized temporaries alive at once. The default chunk_size=1024
suits V up to ~12k; at V=50k chunks of ~256 rows meet the 0.25x target, at V=150k ~64-128.
The default run (3 objectives x 2 sections, 21 subprocesses) takes ~7-12 min on a shared 2-core machine;
--quick takes ~20 s per objective.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import peers
from distill.losses.chunked import chunked_distillation_loss, fused_distillation_loss
from distill.losses.divergences import distillation_loss, resolve_params
from distill.options import DIVERGENCES

SECTIONS = {
    "logits": ("naive", "plain", "chunked", "torchtune"),
    "hidden": ("naive", "plain", "chunked", "fused", "torchtune", "liger", "liger-compiled"),
}
# peer variant -> (its distribution, the objectives it computes)
PEER_VARIANTS = {
    "torchtune": ("torchtune", ("fkl",)),
    "liger": ("liger-kernel", ("fkl", "rkl", "jsd")),
    "liger-compiled": ("liger-kernel", ("fkl", "rkl", "jsd")),
}
TARGETS = {"memory": 0.25, "time": 1.0}  # the targets, vs naive


# ----------------------------------------------------------------------------------------------------------
# the naive reference: everything materialised over [N, V] (DistiLLM style), same math as distill.losses


def naive_loss(name: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float, params: dict):
    p = F.softmax(t / tau, dim=-1, dtype=torch.float32)
    logp = F.log_softmax(t / tau, dim=-1, dtype=torch.float32)
    q = F.softmax(s / tau, dim=-1, dtype=torch.float32)
    logq = F.log_softmax(s / tau, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(s) | torch.isinf(t)
    if name == "fkl":
        x = p * (logp - logq)
    elif name == "rkl":
        x = q * (logq - logp)
    elif name == "jsd":
        b = params["beta"]
        logm = torch.log(b * p + (1 - b) * q)
        x = b * p * (logp - logm) + (1 - b) * q * (logq - logm)
    elif name == "tvd":
        x = 0.5 * (p - q).abs()
    elif name == "skl":
        a = params["alpha"]
        x = p * (logp - torch.log(a * p + (1 - a) * q))
    elif name == "srkl":
        a = params["alpha"]
        x = q * (logq - torch.log((1 - a) * p + a * q))
    elif name == "akl":
        with torch.no_grad():
            p_sorted = p.sort(-1, descending=True).values
            n_head = ((p_sorted.cumsum(-1) - p_sorted) < params["mu"]).sum(-1, keepdim=True).clamp_min(1)
            head = p >= p_sorted.gather(-1, n_head - 1)  # every token at least as likely as the last head one
            gap = (p - q).abs()
            g_head, g_tail = (gap * head).sum(-1, keepdim=True), (gap * ~head).sum(-1, keepdim=True)
            w = g_head / (g_head + g_tail)
        x = w * p * (logp - logq) + (1 - w) * q * (logq - logp)
    elif name == "ab":
        a, b = params["alpha"], params["beta"]
        x = -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)) / (a * b)
    else:
        raise ValueError(f"no naive reference for {name!r}")
    x = torch.masked_fill(x, inf_mask, 0).sum(-1)
    return (x * mask).sum() / mask.sum() * tau**2


# ----------------------------------------------------------------------------------------------------------
# one measurement, in its own process


def status_kib(key: str) -> int:
    """A /proc/self/status value in KiB (VmRSS, VmHWM); bench_peers.py uses it too."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peer_beta(name: str, params: dict) -> float:
    """TRL's / Liger's generalized-JSD beta for one of our objectives: 0 = FKL, 1 = RKL, else JSD(beta)."""
    return {"fkl": 0.0, "rkl": 1.0}.get(name, params.get("beta"))


def _torchtune_loss(student_chunks, teacher_chunks, labels, n_chunks: int):
    loss_fn = peers.torchtune_kd_losses().ForwardKLWithChunkedOutputLoss(num_output_chunks=n_chunks)
    return loss_fn(student_chunks, teacher_chunks, labels)


def _entropy_mean(teacher_logits_rows, mask: torch.Tensor, tau: float) -> float:
    """Mean over masked rows of H(softmax(teacher / tau)), row chunk by row chunk (an iterable of [n, V])."""
    total = 0.0
    for rows, m in teacher_logits_rows:
        logp = F.log_softmax(rows[m] / tau, dim=-1, dtype=torch.float32)
        total += float(-(logp.exp() * logp).sum())
    return total / max(int(mask.sum()), 1)


def _make_step(section: str, variant: str, name: str, args, params: dict):
    """One forward+backward of `variant`, its inputs (kept alive by the closure), and our convention for it.

    Returns (step, leaves, to_ours): step() runs forward+backward and returns the loss; leaves are the student
    inputs that receive gradients; to_ours(loss) -> (loss, grad scale) in our convention (true KL, x tau^2).
    """
    g = torch.Generator().manual_seed(0)
    n, v, h = args.positions, args.vocab, args.hidden
    mask = torch.rand(n, generator=g) < args.mask_frac
    labels = torch.where(mask, 0, -100)  # the peers' ignore_index convention (the label value is unused)
    kw = dict(divergence=name, tau=args.tau, **params)
    tau, n_tt = args.tau, args.tt_chunks
    soft = (lambda x: x) if tau == 1.0 else (lambda x: x / tau)  # a user feeds torchtune logits / tau
    if section == "logits":
        s = (args.scale * torch.randn(n, v, generator=g)).requires_grad_(True)
        t = args.scale * torch.randn(n, v, generator=g)
        leaves = [s]
        teacher_rows = lambda: [(t[i:i + 1024], mask[i:i + 1024]) for i in range(0, n, 1024)]  # noqa: E731

        def torchtune():
            s_chunks = [soft(c) for c in s.view(1, n, v).chunk(n_tt, dim=1)]
            t_chunks = [soft(c) for c in t.view(1, n, v).chunk(n_tt, dim=1)]
            return _torchtune_loss(s_chunks, t_chunks, labels.view(1, n), n_tt)

        loss_of = {
            "naive": lambda: naive_loss(name, s, t, mask, args.tau, params),
            "plain": lambda: distillation_loss(s, t, mask, **kw),
            "chunked": lambda: chunked_distillation_loss(s, t, mask, chunk_size=args.chunk_size, **kw),
            "torchtune": torchtune,
        }[variant]
    else:
        hs = torch.randn(n, h, generator=g).requires_grad_(True)
        ht = torch.randn(n, h, generator=g)
        ws = (args.scale / math.sqrt(h) * torch.randn(v, h, generator=g)).requires_grad_(True)
        wt = args.scale / math.sqrt(h) * torch.randn(v, h, generator=g)
        leaves = [hs, ws]
        teacher_rows = lambda: [(ht[i:i + 1024] @ wt.T, mask[i:i + 1024]) for i in range(0, n, 1024)]  # noqa: E731

        def logits():
            with torch.no_grad():
                t_logits = ht @ wt.T
            return hs @ ws.T, t_logits

        def fused():
            return fused_distillation_loss(hs, ws, ht, wt, mask, chunk_size=args.chunk_size, **kw)

        def torchtune():
            # torchtune's KD recipe: the model projects each chunk of hidden states separately (set_num_output_chunks)
            s_chunks = [soft(c @ ws.T) for c in hs.view(1, n, h).chunk(n_tt, dim=1)]
            with torch.no_grad():
                t_chunks = [soft(c @ wt.T) for c in ht.view(1, n, h).chunk(n_tt, dim=1)]
            return _torchtune_loss(s_chunks, t_chunks, labels.view(1, n), n_tt)

        def liger(compiled: bool):
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=_peer_beta(name, params),
                                         temperature=tau, compiled=compiled, chunk_size=args.chunk_size)
            return lambda: fn(hs, ws, ht, wt, labels)

        loss_of = {
            "naive": lambda: naive_loss(name, *logits(), mask, args.tau, params),
            "plain": lambda: distillation_loss(*logits(), mask, **kw),
            "chunked": lambda: chunked_distillation_loss(*logits(), mask, chunk_size=args.chunk_size, **kw),
            "fused": fused,
            "torchtune": torchtune,
            "liger": liger(False) if variant == "liger" else None,
            "liger-compiled": liger(True) if variant == "liger-compiled" else None,
        }[variant]

    def to_ours(value: float) -> tuple[float, float]:
        if variant == "torchtune":  # cross-entropy at tau, no tau^2
            return (value - _entropy_mean(teacher_rows(), mask, tau)) * tau**2, tau**2
        if variant.startswith("liger"):  # true divergence at tau, no tau^2
            return value * tau**2, tau**2
        return value, 1.0

    def step() -> float:
        for x in leaves:
            x.grad = None
        loss = loss_of()
        loss.backward()
        return loss.item()

    return step, leaves, to_ours


def _grad_fingerprint(leaves: list[torch.Tensor], scale: float) -> tuple[float, float]:
    """(projection on a seeded random direction, norm) of the gradients, times `scale`, row chunk by chunk."""
    g = torch.Generator().manual_seed(1)
    dot = sq = 0.0
    for x in leaves:
        flat = x.grad.reshape(x.grad.shape[0], -1)
        for i in range(0, flat.shape[0], 1024):
            rows = flat[i:i + 1024].double() * scale
            dot += float((rows * torch.randn(rows.shape, generator=g, dtype=torch.float64)).sum())
            sq += float((rows * rows).sum())
    return dot, math.sqrt(sq)


def measure(section: str, variant: str, name: str, args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    params = resolve_params(name, {})
    warm_full = variant == "liger-compiled"  # the compile must happen outside the timed steps, at full size
    compile_s = math.nan
    if warm_full:
        step, leaves, to_ours = _make_step(section, variant, name, args, params)
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
    else:
        # Warm-up on a tiny problem: one-time costs (thread pools, kernel selection) stay out of the numbers.
        tiny = argparse.Namespace(**{**vars(args), "positions": 64, "vocab": min(args.vocab, 1024), "chunk_size": 16})
        _make_step(section, variant, name, tiny, params)[0]()
        step, leaves, to_ours = _make_step(section, variant, name, args, params)
    gc.collect()
    exact = reset_peak()
    base_kib = status_kib("VmRSS")
    times, value = [], math.nan
    for _ in range(args.repeats):
        start = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - start)
    peak_kib = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ours, grad_scale = to_ours(value)
    grad_dot, grad_norm = _grad_fingerprint(leaves, grad_scale)
    if warm_full:
        compile_s -= min(times)
    return {"time_s": min(times), "extra_mib": (peak_kib - base_kib) / 1024, "loss": value, "loss_ours": ours,
            "grad_dot": grad_dot, "grad_norm": grad_norm, "exact_peak": exact, "compile_s": compile_s}


# ----------------------------------------------------------------------------------------------------------
# driver


def _run_child(section: str, variant: str, name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_losses", *argv, "--child", f"{section}:{variant}:{name}"]
    # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap; a fixed 1 MiB
    # threshold returns every tensor-sized block to the OS on free, so RSS follows live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the 'hidden' section")
    ap.add_argument("--objectives", default="fkl,rkl,jsd", help=f"comma list of {','.join(DIVERGENCES)} or 'all'")
    ap.add_argument("--sections", default="logits,hidden", help="comma list of logits,hidden")
    ap.add_argument("--variants", default="all",
                    help=f"comma list of {','.join(dict.fromkeys(v for vs in SECTIONS.values() for v in vs))}, "
                         "or 'all' (naive always runs: it is the baseline of the ratios)")
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk (ours and Liger's)")
    ap.add_argument("--tt-chunks", type=int, default=8, help="torchtune's num_output_chunks (its default: 8)")
    ap.add_argument("--mask-frac", type=float, default=1.0, help="fraction of positions that count")
    ap.add_argument("--scale", type=float, default=3.0, help="std of the random logits")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant (min is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="512 positions x 8192 vocab, chunks of 128, one repeat")
    ap.add_argument("--json", help="also write every measurement to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.positions, args.vocab, args.repeats = 512, 8192, 1
        args.chunk_size = min(args.chunk_size, 128)
    return args


def _variants(section: str, name: str, wanted: set[str] | None) -> list[str]:
    """The variants of `section` that run for objective `name` (naive always: the ratios' baseline)."""
    out = []
    for variant in SECTIONS[section]:
        if wanted is not None and variant != "naive" and variant not in wanted:
            continue
        if variant in PEER_VARIANTS and name not in PEER_VARIANTS[variant][1]:
            continue  # that peer does not compute this objective
        out.append(variant)
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _agreement(r: dict, plain: dict | None) -> tuple[float, float]:
    """(relative loss difference, relative gradient difference) of result r against `plain`, our convention."""
    if plain is None:
        return math.nan, math.nan
    d_grad = max(_rel(r["grad_dot"], plain["grad_dot"]), _rel(r["grad_norm"], plain["grad_norm"]))
    return _rel(r["loss_ours"], plain["loss_ours"]), d_grad


def _peer_summary(rows: list[tuple[str, str, dict[str, dict]]]) -> None:
    """Markdown table: each peer against our plain loss and our lean one (chunked on logits, fused on hidden)."""
    lines = []
    for section, name, res in rows:
        lean = "fused" if section == "hidden" else "chunked"
        for peer in (v for v in res if v in PEER_VARIANTS):
            r, plain, ours = res[peer], res.get("plain"), res.get(lean)
            ratio = lambda key, base: r[key] / base[key] if base else math.nan  # noqa: E731
            d_loss, d_grad = _agreement(r, plain)
            lines.append(f"| {section} | {name} | {peer} | {ratio('time_s', plain):.2f} | {ratio('time_s', ours):.2f} | "
                         f"{ratio('extra_mib', plain):.2f} | {ratio('extra_mib', ours):.2f} | {d_loss:.1e} | "
                         f"{d_grad:.1e} |")
    if not lines:
        return
    print("\npeers vs ours (ratios > 1: the peer is slower / needs more memory; ours-lean = chunked on logits, "
          "fused on hidden; agreement in our convention, relative to plain):\n")
    print("| section | objective | peer | time / plain | time / ours-lean | memory / plain | memory / ours-lean | "
          "loss rel. diff | grad rel. diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.child:
        section, variant, name = args.child.split(":")
        print(json.dumps(measure(section, variant, name, args)))
        return
    names = list(DIVERGENCES) if args.objectives == "all" else args.objectives.split(",")
    sections = args.sections.split(",")
    wanted = None if args.variants == "all" else set(args.variants.split(","))
    known = {v for vs in SECTIONS.values() for v in vs}
    for x in names + sections + sorted(wanted or ()):
        if x not in DIVERGENCES and x not in SECTIONS and x not in known:
            raise SystemExit(f"unknown objective/section/variant {x!r}; allowed: {', '.join(DIVERGENCES)} / "
                             f"{', '.join(SECTIONS)} / {', '.join(sorted(known))}")
    print(f"# positions={args.positions} vocab={args.vocab} hidden={args.hidden} tau={args.tau} "
          f"chunk_size={args.chunk_size} tt_chunks={args.tt_chunks} mask_frac={args.mask_frac} "
          f"repeats={args.repeats} threads={args.threads or torch.get_num_threads()} cpus={os.cpu_count()}")
    print(f"# versions: {peers.versions()}")
    print("# peers: liger = LigerFusedLinearJSDLoss compiled=False (eager, pure PyTorch); liger-compiled = "
          "compiled=True (torch.compile, inductor on CPU); torchtune = ForwardKLWithChunkedOutputLoss (fkl only)")
    one_tensor = args.positions * args.vocab * 4 / 2**20
    print(f"# one fp32 [positions, vocab] tensor = {one_tensor:.0f} MiB; targets vs naive: "
          f"memory <= {TARGETS['memory']}x, time <= {TARGETS['time']}x")
    header = f"{'section':8} {'objective':9} {'variant':14} {'time_s':>7} {'x_naive':>7} {'extra_MiB':>9} " \
             f"{'x_naive':>7} {'loss':>10} {'d_loss':>8} {'d_grad':>8}"
    print(header)
    print("-" * len(header))
    rows, missing = [], set()
    for section in sections:
        for name in names:
            res: dict[str, dict] = {}
            for variant in _variants(section, name, wanted):
                dist = PEER_VARIANTS.get(variant, (None,))[0]
                if dist and peers.version(dist) is None:
                    missing.add(dist)
                    continue
                r = _run_child(section, variant, name, argv)
                if "error" in r:
                    print(f"{section:8} {name:9} {variant:14} failed: {r['error']}", flush=True)
                    continue
                res[variant] = r
                naive = res.get("naive")
                t_ratio = r["time_s"] / naive["time_s"] if naive else math.nan
                m_ratio = r["extra_mib"] / naive["extra_mib"] if naive else math.nan
                d_loss, d_grad = _agreement(r, res.get("plain"))
                notes = "" if r["exact_peak"] else "  (ru_maxrss: peak not reset)"
                if not math.isnan(r["compile_s"]):
                    notes += f"  (compile {r['compile_s']:.0f} s, untimed)"
                print(f"{section:8} {name:9} {variant:14} {r['time_s']:7.2f} {t_ratio:7.2f} {r['extra_mib']:9.0f} "
                      f"{m_ratio:7.2f} {r['loss_ours']:10.5f} {d_loss:8.1e} {d_grad:8.1e}{notes}", flush=True)
            rows.append((section, name, res))
    for dist in sorted(missing):
        print(f"# skipped the {dist} variants: not installed ({peers.INSTALL_HINT})")
    _peer_summary(rows)
    if args.json:
        from distill.files import atomic_write_json

        atomic_write_json(Path(args.json), {
            "args": {k: v for k, v in vars(args).items() if k != "child"}, "versions": peers.versions(),
            "results": [{"section": sec, "objective": name, "variant": var, **r, **dict(zip(
                ("d_loss", "d_grad"), _agreement(r, res.get("plain"))))}
                for sec, name, res in rows for var, r in res.items()],
        })


if __name__ == "__main__":
    main()
