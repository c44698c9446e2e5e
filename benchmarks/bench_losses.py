"""Time and peak extra memory of the distillation losses at real vocabulary sizes, side by side.

    python -m benchmarks.bench_losses                      # 4096 positions x 50257 vocab, fkl,rkl,jsd
    python -m benchmarks.bench_losses --quick              # small sizes, a smoke run
    python -m benchmarks.bench_losses --vocab 151936 --positions 2048 --objectives fkl,akl --chunk-size 512

Variants (forward + backward of one loss, gradient w.r.t. the student):
  naive    a reference in the style of DistiLLM's losses: fp32 softmax / log_softmax of the full [N, V] tensors,
           probability products and inf masks materialised, masked mean at the end.
  plain    distill.losses.distillation_loss.
  chunked  distill.chunked_losses.chunked_distillation_loss (chunk_size rows at a time).
  fused    distill.chunked_losses.fused_distillation_loss (from hidden states; never builds [N, V] logits).

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

import torch
import torch.nn.functional as F

from distill.chunked_losses import chunked_distillation_loss, fused_distillation_loss
from distill.losses import DIVERGENCES, distillation_loss, resolve_params

SECTIONS = {"logits": ("naive", "plain", "chunked"), "hidden": ("naive", "plain", "chunked", "fused")}
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


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_step(section: str, variant: str, name: str, args, params: dict):
    """Inputs (kept alive by the closure) and a function running one forward+backward, returning the loss."""
    g = torch.Generator().manual_seed(0)
    n, v, h = args.positions, args.vocab, args.hidden
    mask = torch.rand(n, generator=g) < args.mask_frac
    kw = dict(divergence=name, tau=args.tau, **params)
    if section == "logits":
        s = (args.scale * torch.randn(n, v, generator=g)).requires_grad_(True)
        t = args.scale * torch.randn(n, v, generator=g)
        leaves = [s]
        loss_of = {
            "naive": lambda: naive_loss(name, s, t, mask, args.tau, params),
            "plain": lambda: distillation_loss(s, t, mask, **kw),
            "chunked": lambda: chunked_distillation_loss(s, t, mask, chunk_size=args.chunk_size, **kw),
        }[variant]
    else:
        hs = torch.randn(n, h, generator=g).requires_grad_(True)
        ht = torch.randn(n, h, generator=g)
        ws = (args.scale / math.sqrt(h) * torch.randn(v, h, generator=g)).requires_grad_(True)
        wt = args.scale / math.sqrt(h) * torch.randn(v, h, generator=g)
        leaves = [hs, ws]

        def logits():
            with torch.no_grad():
                t_logits = ht @ wt.T
            return hs @ ws.T, t_logits

        def fused():
            return fused_distillation_loss(hs, ws, ht, wt, mask, chunk_size=args.chunk_size, **kw)

        loss_of = {
            "naive": lambda: naive_loss(name, *logits(), mask, args.tau, params),
            "plain": lambda: distillation_loss(*logits(), mask, **kw),
            "chunked": lambda: chunked_distillation_loss(*logits(), mask, chunk_size=args.chunk_size, **kw),
            "fused": fused,
        }[variant]

    def step() -> float:
        for x in leaves:
            x.grad = None
        loss = loss_of()
        loss.backward()
        return loss.item()

    return step


def measure(section: str, variant: str, name: str, args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    params = resolve_params(name, {})
    # Warm-up on a tiny problem: one-time costs (thread pools, kernel selection) stay out of the numbers.
    tiny = argparse.Namespace(**{**vars(args), "positions": 64, "vocab": min(args.vocab, 1024), "chunk_size": 16})
    _make_step(section, variant, name, tiny, params)()
    step = _make_step(section, variant, name, args, params)
    gc.collect()
    exact = _reset_peak()
    base_kib = _status_kib("VmRSS")
    times, value = [], math.nan
    for _ in range(args.repeats):
        start = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - start)
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"time_s": min(times), "extra_mib": (peak_kib - base_kib) / 1024, "loss": value, "exact_peak": exact}


# ----------------------------------------------------------------------------------------------------------
# driver


def _run_child(section: str, variant: str, name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", f"{section}:{variant}:{name}"]
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
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--mask-frac", type=float, default=1.0, help="fraction of positions that count")
    ap.add_argument("--scale", type=float, default=3.0, help="std of the random logits")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per variant (min is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="512 positions x 8192 vocab, chunks of 128, one repeat")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.positions, args.vocab, args.repeats = 512, 8192, 1
        args.chunk_size = min(args.chunk_size, 128)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.child:
        section, variant, name = args.child.split(":")
        print(json.dumps(measure(section, variant, name, args)))
        return
    names = list(DIVERGENCES) if args.objectives == "all" else args.objectives.split(",")
    sections = args.sections.split(",")
    for x in names + sections:
        if x not in DIVERGENCES and x not in SECTIONS:
            raise SystemExit(f"unknown objective/section {x!r}; allowed: {', '.join(DIVERGENCES)} / logits, hidden")
    print(f"# positions={args.positions} vocab={args.vocab} hidden={args.hidden} tau={args.tau} "
          f"chunk_size={args.chunk_size} mask_frac={args.mask_frac} repeats={args.repeats} "
          f"torch={torch.__version__} threads={args.threads or torch.get_num_threads()} cpus={os.cpu_count()}")
    one_tensor = args.positions * args.vocab * 4 / 2**20
    print(f"# one fp32 [positions, vocab] tensor = {one_tensor:.0f} MiB; targets vs naive: "
          f"memory <= {TARGETS['memory']}x, time <= {TARGETS['time']}x")
    header = f"{'section':8} {'objective':9} {'variant':8} {'time_s':>7} {'x_naive':>7} {'extra_MiB':>9} " \
             f"{'x_naive':>7} {'loss':>10}"
    print(header)
    print("-" * len(header))
    for section in sections:
        for name in names:
            naive = None
            for variant in SECTIONS[section]:
                r = _run_child(section, variant, name, argv)
                if "error" in r:
                    print(f"{section:8} {name:9} {variant:8} failed: {r['error']}")
                    continue
                naive = r if variant == "naive" else naive
                t_ratio = r["time_s"] / naive["time_s"] if naive else math.nan
                m_ratio = r["extra_mib"] / naive["extra_mib"] if naive else math.nan
                flag = "" if r["exact_peak"] else "  (ru_maxrss: peak not reset)"
                print(f"{section:8} {name:9} {variant:8} {r['time_s']:7.2f} {t_ratio:7.2f} {r['extra_mib']:9.0f} "
                      f"{m_ratio:7.2f} {r['loss']:10.5f}{flag}", flush=True)


if __name__ == "__main__":
    main()
