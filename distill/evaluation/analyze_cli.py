"""`distill-analyze`: the gradient analysis (distill.evaluation.gradients) of a teacher and a student on real
examples, from the command line; writes grad_analysis.{csv,md,png} atomically.

    distill-analyze --demo                                  # distill-demo's teacher and warm start
    distill-analyze --demo --demo-cell rkl-tau1-s0          # ... and a distilled cell of its sweep
    distill-analyze --teacher T --student S --data test.jsonl --tokenizer T --taus 1,2,4
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from distill import models
from distill.config import CONF_DIR, compose
from distill.data import records as data_mod
from distill.data import encoding
from distill.data.embedded import SPLITS, prepare_embedded
from distill.evaluation.gradients import (DEFAULT_TAUS, OUTPUT_NAMES, parse_objectives, parse_taus, run_analysis,
                                          table_markdown, teacher_topk_mask)
from distill.options import DIVERGENCES
from distill.sweep.demo import prep_model_dirs

EXAMPLES = """examples:
  distill-analyze --demo                                  # distill-demo's teacher and SFT warm start
  distill-analyze --demo --demo-cell rkl-tau1-s0          # the same teacher and a distilled cell of the demo
  distill-analyze --teacher T --student S --data test.jsonl --tokenizer T --taus 1,2,4 --out outputs/analysis
"""

def _data_defaults(name: str) -> dict[str, Any]:
    """template / lengths (and, for the embedded suite, its generator) from conf/data/<name>.yaml."""
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"), resolve=True)


def load_examples(data: str, *, split: str, tokenizer_dir: str | None, data_root: Path,
                  num_examples: int) -> tuple[list[Any], str | Path, dict[str, Any]]:
    """Records to analyse, the tokenizer dir to encode them with, and the data config used.

    `data` is "embedded" (the generated suite, split `split`) or a JSONL file in the MiniLLM schema."""
    if data == "embedded":
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} of the embedded suite; allowed: {', '.join(SPLITS)}")
        cfg = _data_defaults("embedded")
        suite = prepare_embedded(cfg, data_root)
        records = data_mod.read_records(suite / f"{split}.jsonl")
        tokenizer_dir = tokenizer_dir or suite / "tokenizer"
    else:
        if not Path(data).is_file():
            raise FileNotFoundError(f"--data {data!r}: no such file (give a JSONL file in the MiniLLM schema, or 'embedded')")
        if tokenizer_dir is None:
            raise ValueError(f"--data {data!r} is a JSONL file: also give --tokenizer DIR")
        cfg = _data_defaults("dolly")
        records = data_mod.read_records(data, "jsonl")
    return records[:num_examples], tokenizer_dir, cfg


def _check_dir(path: str | Path, what: str) -> Path:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such directory (expected a Hugging Face model/tokenizer dir)")
    return Path(path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _load_model(path: Path, what: str) -> torch.nn.Module:
    try:
        return models.load_model(path, torch.float32)
    except (OSError, ValueError) as exc:  # e.g. a dir without config.json / weights
        raise ValueError(f"{what} {str(path)!r}: cannot load a model: {_one_line(exc)}") from None


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-analyze", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Share of each divergence's gradient on the teacher's non-dominant tokens vs the "
                    "distillation temperature tau; writes grad_analysis.{csv,md,png}.")
    p.add_argument("--demo", nargs="?", const=os.environ.get("DISTILL_OUTPUT", "outputs"), default=None, metavar="ROOT",
                   help="analyse distill-demo's teacher and SFT student under ROOT (default: $DISTILL_OUTPUT or "
                        "outputs), with its data and template; writes ROOT/demo/analysis unless --out is given")
    p.add_argument("--demo-cell", default=None, metavar="NAME",
                   help="with --demo: the student is a distilled cell of the demo sweep instead of the warm start, "
                        "NAME its dir name without the signature (e.g. rkl-tau1-s0); writes ROOT/demo/analysis-NAME")
    p.add_argument("--teacher", default=None, help="teacher: Hugging Face model dir")
    p.add_argument("--student", default=None, help="student: Hugging Face model dir (e.g. a job's exported student/)")
    p.add_argument("--template", default=None, help="prompt template (default: the data config's)")
    p.add_argument("--data", default="embedded", help="'embedded' (generated suite) or a JSONL file in the MiniLLM schema")
    p.add_argument("--split", default="valid", help="split of the embedded suite (default: valid)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the embedded suite's; required for JSONL)")
    p.add_argument("--data-root", default=None, help="where the embedded suite is built (default: $DISTILL_OUTPUT/data or outputs/data)")
    p.add_argument("--objectives", default=",".join(DIVERGENCES), help="comma-separated divergences (default: all)")
    p.add_argument("--taus", default=",".join(f"{t:g}" for t in DEFAULT_TAUS), help="comma-separated taus (default: 0.5,1,2,4,8)")
    p.add_argument("--topk", type=int, default=1, help="teacher's dominant tokens per position (default: 1)")
    p.add_argument("--num-examples", type=int, default=64, help="examples to run teacher-forced (default: 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-positions", type=int, default=4096,
                   help="cap on response positions analysed (logits are kept as [N, V] on the CPU; default: 4096)")
    p.add_argument("--max-length", type=int, default=None, help="override the data config's max_length")
    p.add_argument("--out", default=None, help="output dir (default: outputs/analysis)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--wandb", action="store_true", help="also log the table and plot to an OFFLINE W&B run in --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The `distill-analyze` CLI. Bad input -> one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, OSError) as exc:
        print(f"distill-analyze: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _use_demo(args: argparse.Namespace) -> None:
    """Fill in the teacher, student, data and template of `distill-demo --root ROOT`."""
    root = Path(args.demo).resolve()
    dirs = prep_model_dirs(root)
    cfg = compose(["experiment=demo", f"paths.root={root}"])
    args.teacher = args.teacher or str(dirs["teacher"])
    if args.demo_cell:
        args.student = args.student or str(demo_cell_student(Path(cfg.paths.root) / "demo", args.demo_cell))
    args.student = args.student or str(dirs["student"])
    args.data_root = args.data_root or cfg.paths.data_dir
    args.template = args.template or cfg.data.template
    args.out = args.out or str(root / "demo" / (f"analysis-{args.demo_cell}" if args.demo_cell else "analysis"))


def demo_cell_student(sweep_dir: Path, name: str) -> Path:
    """The exported student of the one completed cell `<sweep_dir>/<name>-<8 hex>/` (ValueError otherwise)."""
    import re

    found = sorted(d for d in sweep_dir.glob(f"{name}-*")
                   if re.fullmatch(re.escape(name) + r"-[0-9a-f]{8}", d.name) and (d / "student").is_dir())
    if len(found) != 1:
        have = sorted({re.sub(r"-[0-9a-f]{8}$", "", d.name) for d in sweep_dir.glob("*-*") if (d / "student").is_dir()})
        what = "no" if not found else f"{len(found)}"
        raise ValueError(f"--demo-cell {name!r}: {what} finished cell of that name under {sweep_dir} "
                         f"(cells with a student: {', '.join(have) or 'none'})")
    return found[0] / "student"


def _main(args: argparse.Namespace) -> int:
    if args.demo_cell and args.demo is None:
        raise ValueError("--demo-cell needs --demo [ROOT]")
    if args.demo is not None:
        _use_demo(args)
    if args.teacher is None or args.student is None:
        raise ValueError("give --teacher and --student model dirs, or --demo [ROOT] for distill-demo's pair")
    args.out = args.out or "outputs/analysis"
    # Validate everything cheap before loading models.
    objectives, taus = parse_objectives(args.objectives), parse_taus(args.taus)
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {args.topk}")
    if min(args.num_examples, args.batch_size, args.max_positions) < 1:
        raise ValueError(f"--num-examples, --batch-size and --max-positions must be >= 1, got "
                         f"{args.num_examples}, {args.batch_size} and {args.max_positions}")
    teacher_dir, student_dir = _check_dir(args.teacher, "--teacher"), _check_dir(args.student, "--student")
    if args.tokenizer is not None:
        _check_dir(args.tokenizer, "--tokenizer")
    data_root = Path(args.data_root or Path(os.environ.get("DISTILL_OUTPUT", "outputs")) / "data")
    records, tok_dir, data_cfg = load_examples(args.data, split=args.split, tokenizer_dir=args.tokenizer,
                                               data_root=data_root, num_examples=args.num_examples)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our one-line errors
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    tokenizer = models.load_tokenizer(tok_dir)
    teacher = _load_model(teacher_dir, "--teacher").to(device)
    student = _load_model(student_dir, "--student").to(device)
    models.check_vocab(student, teacher, tokenizer)
    teacher_topk_mask(torch.zeros(1, student.get_output_embeddings().weight.shape[0]), args.topk)  # check k early

    # Encode as in training (prompt masked with -100, first reference + EOS), within the models' context.
    max_len = args.max_length or int(data_cfg["max_length"])
    limits = [m for m in (_max_positions(teacher), _max_positions(student)) if m]
    max_len = min([max_len, *limits])
    max_prompt = min(int(data_cfg["max_prompt_length"]), max_len - 1)
    template = args.template or data_cfg.get("template", "alpaca")
    examples = [encoding.encode_example(tokenizer, r, template=template, max_length=max_len,
                                        max_prompt_length=max_prompt,
                                        truncation_side=data_cfg.get("truncation_side", "left")) for r in records]
    batches = (encoding.collate_train(examples[i:i + args.batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), args.batch_size))
    title = f"Gradient vs tau: {len(examples)} examples of {Path(args.data).name}"
    rows = run_analysis(teacher, student, batches, objectives=objectives, taus=taus, topk=args.topk,
                        out_dir=args.out, max_positions=args.max_positions, wandb=args.wandb, title=title)
    print(table_markdown(rows, title))
    print(f"teacher {teacher_dir}, student {student_dir}; wrote {', '.join(str(Path(args.out) / n) for n in OUTPUT_NAMES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
