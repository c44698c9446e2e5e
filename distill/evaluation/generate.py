"""Evaluation: sampled generation + ROUGE-L (the MiniLLM -> DistiLLM protocol) and teacher-forced metrics.

Protocol (what the anchors report, so our numbers are comparable):
  - prompts are left-padded and truncated to `max_prompt_length`; at most `max_length - prompt length`
    new tokens are generated (per batch: the padded prompt length), stopping at EOS;
  - sampling with top_k=0, top_p=1, sampling temperature 1, no_repeat_ngram_size=6, one run per eval seed;
  - ROUGE-L = rouge_score's rougeL F-measure with the Porter stemmer, max over an example's references,
    mean over examples, x100; reported as mean and std over the eval seeds.

Two temperatures exist in this project. `temperature` here is always the SAMPLING temperature of
generation; the distillation temperature is `tau` (see distill/losses/divergences.py) and never enters this module:
teacher-forced KL is measured at tau = 1, i.e. between the models' actual distributions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import string
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from distill.cell.results import GENERATIONS_SUFFIX
from distill.data.records import Record
from distill.data.encoding import IGNORE_INDEX, encode_prompts_left, render_prompt, response_mask
from distill.losses.divergences import kl_at_tau1
from distill.files import atomic_write_text


EVAL_CFG_KEYS = (
    "seeds", "batch_size", "max_examples", "do_sample", "top_k", "top_p", "temperature",
    "no_repeat_ngram_size", "max_new_tokens", "write_generations",
)  # the keys of conf/eval/default.yaml


# ----------------------------------------------------------------------------------------------------
# Metrics (pure)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_pairs(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) == 0:
        raise ValueError("got no predictions; need at least one (prediction, references) pair")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists; need equal lengths")
    for i, refs in enumerate(references):
        # a bare string would silently be scored character by character
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] is {refs!r}; need a non-empty list of reference strings")


def rouge_l_scores(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Per-example ROUGE-L F-measure x100 (Porter stemmer), the max over that example's references."""
    _check_pairs(predictions, references)
    scorer = _rouge_l_scorer()
    return [
        100.0 * max(scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure for ref in refs)
        for pred, refs in zip(predictions, references)
    ]


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """ROUGE-L as MiniLLM/DistiLLM report it: mean over examples of the max-over-references F-measure, x100.

    `references[i]` is the list of acceptable answers for `predictions[i]`. An empty prediction scores 0.
    """
    return statistics.fmean(rouge_l_scores(predictions, references))


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation used by MiniLLM's exact match: lowercase, drop ASCII punctuation,
    collapse runs of whitespace to one space and strip the ends."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Percentage (x100) of predictions equal to at least one reference after `normalize_answer`
    (case, punctuation and whitespace are ignored)."""
    _check_pairs(predictions, references)
    hits = [
        any(normalize_answer(pred) == normalize_answer(ref) for ref in refs)
        for pred, refs in zip(predictions, references)
    ]
    return 100.0 * sum(hits) / len(hits)


# ----------------------------------------------------------------------------------------------------
# Generation


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _decode_new_tokens(tokenizer, new_tokens: torch.Tensor, eos_token_id: int | None) -> list[str]:
    """Decode generated ids, cutting each row at its first EOS (what follows is padding)."""
    texts = []
    for row in new_tokens.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        # MiniLLM strips the response before scoring; ROUGE/EM ignore the ends anyway, this keeps files clean
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run the body with the global RNG seeded by `seed`, then give the caller its own RNG state back.

    Sampling inside is reproducible for a given seed (and batching) and consumes nothing from the
    training run's RNG stream.
    """
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def sample_new_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    no_repeat_ngram_size: int = 0,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """New tokens [B, n <= max_new_tokens] after LEFT-padded prompts: HF `generate` with the KV cache,
    stopping once every row has emitted EOS (rows that stopped earlier are filled with `pad_token_id`).

    Uses the global RNG (wrap the call in `seeded`). `synced_gpus=True` keeps every rank stepping until
    all ranks are done: needed when forwards are collective (ZeRO-3 gathers parameters in each forward).
    Runs under no_grad in eval mode and restores the model's mode.
    """
    decoding = dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature) if do_sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                no_repeat_ngram_size=no_repeat_ngram_size,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                use_cache=True,
                synced_gpus=synced_gpus,
                **decoding,
            )
    finally:
        model.train(was_training)
    return sequences[:, input_ids.shape[1]:]


def _check_generate_args(n_prompts: int, batch_size: int, max_length: int, max_prompt_length: int,
                         max_new_tokens: int | None, do_sample: bool, temperature: float) -> None:
    if n_prompts == 0:
        raise ValueError("got no prompts; need at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; need >= 1")
    if max_length < 1 or max_prompt_length < 1:
        raise ValueError(f"max_length={max_length}, max_prompt_length={max_prompt_length}; both need to be >= 1")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; need None or >= 1")
    if do_sample and temperature <= 0:
        raise ValueError(f"sampling temperature={temperature}; need > 0 (use do_sample=False for greedy)")


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 32,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    no_repeat_ngram_size: int = 6,
    max_new_tokens: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    truncation_side: str = "left",
    synced_gpus: bool = False,
) -> list[str]:
    """Generate one response per prompt with HF `model.generate`, in batches, and return the decoded
    new tokens only (special tokens skipped, whitespace stripped), in prompt order.

    Prompts are left-padded (`distill.data.encoding.encode_prompts_left`, truncated to `max_prompt_length` on
    `truncation_side`, as in training).
    Each batch may add `max_new_tokens` tokens, or, when None, `max_length - padded prompt length`
    (at least 1); generation stops at the tokenizer's EOS. `temperature` is the SAMPLING temperature
    (not the distillation tau); `do_sample=False` means greedy decoding, and the sampling knobs are
    then ignored. The global RNG is seeded with `seed` inside a forked RNG state, so a call is
    reproducible for a given (seed, batch_size) and leaves the caller's RNG untouched. The model is
    put in eval mode for the call and its previous mode restored afterwards. `truncation_side` says
    which end of an over-long prompt is kept (as `data.truncation_side`); `synced_gpus` keeps the
    ranks of a ZeRO-3 model stepping together (every rank must call with as many prompts).
    """
    _check_generate_args(len(prompts), batch_size, max_length, max_prompt_length, max_new_tokens, do_sample,
                         temperature)
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    device = _model_device(model)
    outputs: list[str] = []
    with seeded(seed, device):
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
            enc = encode_prompts_left(tokenizer, prompts[start : start + batch_size], max_prompt_length,
                                      truncation_side)
            prompt_len = enc["input_ids"].shape[1]
            new_tokens = sample_new_tokens(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens if max_new_tokens is not None else max(1, max_length - prompt_len),
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample, top_k=top_k,
                top_p=top_p, temperature=temperature, no_repeat_ngram_size=no_repeat_ngram_size,
                synced_gpus=synced_gpus,
            )
            outputs.extend(_decode_new_tokens(tokenizer, new_tokens, eos_token_id))
    return outputs


# ----------------------------------------------------------------------------------------------------
# Benchmarks (generation + scoring + files)


def _checked_eval_cfg(eval_cfg: Mapping) -> dict:
    missing = [k for k in EVAL_CFG_KEYS if k not in eval_cfg]
    if missing:
        raise ValueError(f"eval_cfg lacks keys {missing}; need all of {list(EVAL_CFG_KEYS)} (conf/eval/default.yaml)")
    cfg = {k: eval_cfg[k] for k in EVAL_CFG_KEYS}
    cfg["seeds"] = [int(s) for s in cfg["seeds"]]  # also turns an OmegaConf ListConfig into a list
    if not cfg["seeds"]:
        raise ValueError("eval_cfg.seeds is empty; need at least one eval seed")
    if cfg["max_examples"] is not None and cfg["max_examples"] < 1:
        raise ValueError(f"eval_cfg.max_examples={cfg['max_examples']}; need null or >= 1")
    return cfg


def evaluate_benchmarks(
    model,
    tokenizer,
    benchmarks: dict[str, list[Record]],
    *,
    eval_cfg: Mapping,
    template: str,
    max_length: int,
    max_prompt_length: int,
    out_dir: Path | None,
    truncation_side: str = "left",
    progress: bool = True,
) -> dict[str, dict]:
    """Generate for every benchmark under every eval seed and score with ROUGE-L and exact match.

    Returns, per benchmark: rougeL_mean, rougeL_std, rougeL_per_seed, exact_match_mean,
    exact_match_per_seed, seeds and n (examples scored). The std over seeds is the POPULATION std
    (ddof=0, as numpy's default), so a single seed gives 0. With `out_dir`, writes
    `<benchmark>.json` (that summary) and, if eval_cfg.write_generations, `<benchmark>.generations.jsonl`
    (one line per example per seed: seed, prompt, output, references, rougeL), both atomically.
    `progress`: a bar per benchmark and seed.
    """
    cfg = _checked_eval_cfg(eval_cfg)
    out_dir = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict] = {}
    for name, records in benchmarks.items():
        records = list(records)
        if cfg["max_examples"] is not None:
            records = records[: cfg["max_examples"]]
        if not records:
            raise ValueError(f"benchmark {name!r} has no records; need at least one")

        def generate_for(prompts: list[str], seed: int) -> list[str]:
            return generate(
                model, tokenizer, prompts,
                max_length=max_length, max_prompt_length=max_prompt_length,
                batch_size=cfg["batch_size"], do_sample=cfg["do_sample"], top_k=cfg["top_k"],
                top_p=cfg["top_p"], temperature=cfg["temperature"],
                no_repeat_ngram_size=cfg["no_repeat_ngram_size"], max_new_tokens=cfg["max_new_tokens"],
                seed=seed, progress=progress, desc=f"eval {name} seed={seed}", truncation_side=truncation_side,
            )

        results[name] = _score_benchmark(name, records, [render_prompt(r, template, tokenizer) for r in records],
                                         generate_for, cfg, out_dir)
    return results


def _score_benchmark(name: str, records: list[Record], prompts: list[str],
                     generate_for: Callable[[list[str], int], list[str]], cfg: dict, out_dir: Path | None) -> dict:
    """One benchmark under every eval seed: its summary, written (with the generations) under `out_dir`."""
    references = [list(r.outputs) for r in records]
    rouge_per_seed, em_per_seed, lines = [], [], []
    for seed in cfg["seeds"]:
        outputs = generate_for(prompts, seed)
        scores = rouge_l_scores(outputs, references)
        rouge_per_seed.append(statistics.fmean(scores))
        em_per_seed.append(exact_match(outputs, references))
        if out_dir is not None and cfg["write_generations"]:
            for prompt, output, refs, score in zip(prompts, outputs, references, scores):
                lines.append({"seed": seed, "prompt": prompt, "output": output, "references": refs, "rougeL": score})
    summary = {
        "rougeL_mean": statistics.fmean(rouge_per_seed),
        "rougeL_std": statistics.pstdev(rouge_per_seed),
        "rougeL_per_seed": rouge_per_seed,
        "exact_match_mean": statistics.fmean(em_per_seed),
        "exact_match_per_seed": em_per_seed,
        "seeds": cfg["seeds"],
        "n": len(records),
    }
    if out_dir is not None:
        if cfg["write_generations"]:
            jsonl = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            atomic_write_text(out_dir / f"{name}{GENERATIONS_SUFFIX}", jsonl)
        atomic_write_text(out_dir / f"{name}.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------------
# Teacher-forced metrics


def teacher_forced_metrics(student, batches: Iterable[dict], teacher=None, allow_empty: bool = False) -> dict[str, float]:
    """Token-level cross-entropy of `student` on the batches' labels and, with a `teacher`, the exact
    forward KL(teacher || student) and reverse KL(student || teacher) at tau = 1.

    Batches hold input_ids, attention_mask and labels (IGNORE_INDEX = -100 marks unscored positions);
    logits at position t predict labels at t + 1 (causal-LM shift). Every value is a sum over all
    scored tokens of all batches divided by their total count ("tokens"), so the result does not
    depend on how the data was batched. Runs under no_grad in eval mode and restores each model's mode.
    `allow_empty` returns zeros with tokens=0 instead of raising when nothing is scored (one rank's
    shard of a distributed validation may be empty; the caller aggregates sums over ranks).
    """
    models = [student] if teacher is None else [student, teacher]
    modes = [m.training for m in models]
    device = _model_device(student)
    ce_sum, fkl_sum, rkl_sum, tokens = 0.0, 0.0, 0.0, 0
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            for batch in batches:
                missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
                if missing:
                    raise ValueError(f"batch lacks {missing}; need input_ids, attention_mask and labels")
                inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                labels = batch["labels"].to(device)
                targets, mask = labels[:, 1:], response_mask(labels)
                # forward even when nothing is scored: ZeRO-3 forwards are collective across ranks
                s_logits = student(**inputs, use_cache=False).logits[:, :-1]
                # float32: bf16 log-softmax sums drift visibly over many tokens
                ce_sum += F.cross_entropy(
                    s_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                ).item()
                tokens += int(mask.sum())
                if teacher is not None:
                    t_logits = teacher(**inputs, use_cache=False).logits[:, :-1].to(device)
                    kl = kl_at_tau1(s_logits, t_logits, mask)
                    fkl_sum += float(kl["fkl"])
                    rkl_sum += float(kl["rkl"])
    finally:
        for m, was_training in zip(models, modes):
            m.train(was_training)
    if tokens == 0 and allow_empty:
        return {"ce": 0.0, "tokens": 0, **({"fkl": 0.0, "rkl": 0.0} if teacher is not None else {})}
    if tokens == 0:
        raise ValueError("the batches hold no scored tokens (every label is -100 after the causal shift)")
    metrics = {"ce": ce_sum / tokens, "tokens": tokens}
    if teacher is not None:
        metrics["fkl"] = fkl_sum / tokens
        metrics["rkl"] = rkl_sum / tokens
    return metrics
