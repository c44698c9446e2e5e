"""Tests for distill/evaluation/generate.py: metrics on hand-worked cases, generation on a tiny random GPT-2,
benchmark files/summaries, and teacher-forced CE/KL against manual computations."""

import json
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from rouge_score import rouge_scorer
from transformers import GPT2Config, GPT2LMHeadModel

from tests.conftest import byte_bpe_tokenizer

from distill.data.records import Record
from distill.data.encoding import encode_prompts_left, render_prompt
from distill.evaluation.generate import (
    evaluate_benchmarks,
    exact_match,
    generate,
    normalize_answer,
    rouge_l,
    rouge_l_scores,
    teacher_forced_metrics,
)

CONF_EVAL = Path(__file__).resolve().parents[2] / "conf" / "eval" / "default.yaml"
PROMPTS = ["the quick brown fox", "hello world, how are you today my friend", "name a colour"]


# ----------------------------------------------------------------------------------------------------
# ROUGE-L and exact match


def test_rouge_l_identical_is_100_and_disjoint_is_0():
    assert rouge_l(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert rouge_l(["the cat sat"], [["dogs bark loudly"]]) == 0.0


def test_rouge_l_uses_the_porter_stemmer():
    assert rouge_l(["running", "runs"], [["run"], ["run"]]) == pytest.approx(100.0)
    # without the stemmer these would not match at all, so the 100 above comes from stemming
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert plain.score("run", "running")["rougeL"].fmeasure == 0.0


def test_rouge_l_hand_computed_lcs_f1():
    # prediction "the quick fox jumps" (4 tokens), reference "the fox jumps high over fences" (6 tokens):
    # LCS = "the fox jumps" = 3 -> P = 3/4, R = 3/6, F1 = 2PR / (P + R) = 0.6
    assert rouge_l(["the quick fox jumps"], [["the fox jumps high over fences"]]) == pytest.approx(60.0)


def test_rouge_l_takes_max_over_references_and_mean_over_examples():
    refs = ["the fox jumps high over fences", "dogs bark", "the quick fox jumps"]
    assert rouge_l(["the quick fox jumps"], [refs]) == pytest.approx(100.0)
    assert rouge_l(["the quick fox jumps"], [refs[:2]]) == pytest.approx(60.0)
    # mean over examples: 100 and 0 -> 50
    assert rouge_l(["a b", "x"], [["a b"], ["y"]]) == pytest.approx(50.0)
    assert rouge_l_scores(["a b", "x"], [["a b"], ["y"]]) == pytest.approx([100.0, 0.0])


def test_rouge_l_empty_prediction_scores_zero():
    assert rouge_l([""], [["the cat sat"]]) == 0.0


@pytest.mark.parametrize(
    "predictions, references",
    [
        ([], []),  # nothing to score
        (["a"], [["a"], ["b"]]),  # length mismatch
        (["a"], [[]]),  # an example without references
        (["a"], ["a"]),  # a bare string instead of a list of references
    ],
)
def test_metrics_reject_bad_input(predictions, references):
    with pytest.raises(ValueError):
        rouge_l(predictions, references)
    with pytest.raises(ValueError):
        exact_match(predictions, references)


def test_exact_match_normalises_case_punctuation_whitespace():
    assert normalize_answer("  The  Cat!\n") == "the cat"
    assert exact_match(["  The  Cat!\n"], [["the cat"]]) == 100.0
    assert exact_match(["the cat"], [["the dog"]]) == 0.0
    assert exact_match(["the cat", "a dog"], [["x", "The cat."], ["no"]]) == 50.0
    # near misses are not matches
    assert exact_match(["the cats"], [["the cat"]]) == 0.0


# ----------------------------------------------------------------------------------------------------
# Tiny tokenizer and model


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, how are you today my friend",
        "name a colour: red, green, blue",
        "### Instruction: ### Input: ### Response:",
    ]
    return byte_bpe_tokenizer(corpus * 20, 320, ["<|endoftext|>", "<pad>"], eos="<|endoftext|>", pad="<pad>")


def make_model(tokenizer, seed=0, logit_bias=None):
    """A 2-layer 32-d GPT-2; `logit_bias` {token_id: value} is added to every position's logits."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_layer=2,
        n_embd=32,
        n_head=2,
        initializer_range=0.3,  # peaked logits: greedy argmax is far from ties
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if logit_bias:
        bias = torch.zeros(len(tokenizer))
        for token_id, value in logit_bias.items():
            bias[token_id] = value
        model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model.eval()  # like from_pretrained; a fresh module is in train mode (dropout on)


def spy_on_generate(model):
    """Record (prompt length, returned length) of every model.generate call."""
    calls = []
    original = model.generate

    def spy(*args, **kwargs):
        sequences = original(*args, **kwargs)
        calls.append((kwargs["input_ids"].shape[1], sequences.shape[1]))
        return sequences

    model.generate = spy
    return calls


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="module")
def no_eos_model(tokenizer):
    return make_model(tokenizer, logit_bias={tokenizer.eos_token_id: -1e9})


GEN = dict(max_length=24, max_prompt_length=16, progress=False)


# ----------------------------------------------------------------------------------------------------
# generate


def test_generate_returns_one_string_per_prompt(model, tokenizer):
    outputs = generate(model, tokenizer, PROMPTS, batch_size=2, **GEN)
    assert len(outputs) == len(PROMPTS) and all(isinstance(o, str) for o in outputs)


def test_generate_max_new_tokens_defaults_to_max_length_minus_padded_prompt(tokenizer):
    model = make_model(tokenizer, logit_bias={tokenizer.eos_token_id: -1e9})  # never stops early
    calls = spy_on_generate(model)
    generate(model, tokenizer, PROMPTS, batch_size=2, **GEN)
    assert len(calls) == 2  # 3 prompts in batches of 2
    for prompt_len, total_len in calls:
        assert total_len == GEN["max_length"]
    expected_prompt_lens = [
        encode_prompts_left(tokenizer, PROMPTS[i : i + 2], GEN["max_prompt_length"])["input_ids"].shape[1]
        for i in (0, 2)
    ]
    assert [p for p, _ in calls] == expected_prompt_lens


def test_generate_respects_explicit_max_new_tokens_and_at_least_one(tokenizer):
    model = make_model(tokenizer, logit_bias={tokenizer.eos_token_id: -1e9})
    calls = spy_on_generate(model)
    generate(model, tokenizer, PROMPTS, batch_size=8, max_new_tokens=5, **GEN)
    assert [t - p for p, t in calls] == [5]
    # prompt longer than max_length still gets one new token
    generate(model, tokenizer, PROMPTS[1:2], max_length=3, max_prompt_length=32, progress=False)
    assert calls[-1][1] - calls[-1][0] == 1


def test_generate_stops_at_eos_and_drops_it(tokenizer):
    model = make_model(tokenizer, logit_bias={tokenizer.eos_token_id: 1e4})  # EOS is always sampled
    calls = spy_on_generate(model)
    outputs = generate(model, tokenizer, PROMPTS, batch_size=8, **GEN)
    assert outputs == ["", "", ""]
    assert [t - p for p, t in calls] == [1]  # stopped after the first (EOS) token, not at max_length


def test_generate_same_seed_reproduces_different_seed_differs(no_eos_model, tokenizer):
    a = generate(no_eos_model, tokenizer, PROMPTS, seed=1, **GEN)
    b = generate(no_eos_model, tokenizer, PROMPTS, seed=1, **GEN)
    c = generate(no_eos_model, tokenizer, PROMPTS, seed=2, **GEN)
    assert a == b
    assert a != c


def test_generate_leaves_caller_rng_and_train_mode_untouched(no_eos_model, tokenizer):
    no_eos_model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(no_eos_model, tokenizer, PROMPTS, seed=7, **GEN)
    assert torch.equal(torch.rand(3), expected)
    assert no_eos_model.training
    no_eos_model.eval()


def test_greedy_is_deterministic_and_ignores_seed(no_eos_model, tokenizer):
    a = generate(no_eos_model, tokenizer, PROMPTS, do_sample=False, seed=1, **GEN)
    b = generate(no_eos_model, tokenizer, PROMPTS, do_sample=False, seed=2, **GEN)
    assert a == b
    assert all(len(o) > 0 for o in a)


def test_greedy_left_padding_matches_unbatched(no_eos_model, tokenizer):
    short, long = PROMPTS[2], PROMPTS[1]
    common = dict(do_sample=False, max_new_tokens=8, max_length=40, max_prompt_length=32, progress=False)
    alone = generate(no_eos_model, tokenizer, [short], **common)
    batched = generate(no_eos_model, tokenizer, [short, long], batch_size=2, **common)
    assert len(tokenizer(short)["input_ids"]) < len(tokenizer(long)["input_ids"])  # the short one is padded
    assert batched[0] == alone[0]


def test_generate_truncates_prompts_on_the_configured_side(no_eos_model, tokenizer, monkeypatch):
    from distill.evaluation import generate as ev

    seen = []
    real = ev.encode_prompts_left
    monkeypatch.setattr(ev, "encode_prompts_left", lambda tok, p, n, side="left": seen.append(
        real(tok, p, n, side)["input_ids"].tolist()) or real(tok, p, n, side))
    common = dict(do_sample=False, max_new_tokens=2, max_length=40, max_prompt_length=3, progress=False)
    generate(no_eos_model, tokenizer, [PROMPTS[1]], **common)
    generate(no_eos_model, tokenizer, [PROMPTS[1]], truncation_side="right", **common)
    ids = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    assert seen == [[ids[-3:]], [ids[:3]]]


def test_generate_rejects_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError):
        generate(model, tokenizer, [], **GEN)
    with pytest.raises(ValueError):
        generate(model, tokenizer, PROMPTS, batch_size=0, **GEN)
    with pytest.raises(ValueError):
        generate(model, tokenizer, PROMPTS, temperature=0.0, **GEN)


# ----------------------------------------------------------------------------------------------------
# evaluate_benchmarks


def eval_cfg(**overrides):
    """conf/eval/default.yaml with overrides, as the training job passes it."""
    cfg = OmegaConf.load(CONF_EVAL)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def make_records(outputs_per_example):
    instructions = ["name a colour", "say hello", "describe the fox"]
    return [Record(instruction=i, input="", outputs=tuple(o)) for i, o in zip(instructions, outputs_per_example)]


def test_evaluate_benchmarks_writes_files_and_summarises_seeds(no_eos_model, tokenizer, tmp_path):
    benchmarks = {"test": make_records([["red"], ["hello world", "hi"], ["the quick brown fox"]])}
    cfg = eval_cfg(seeds=[10, 20], batch_size=2, max_new_tokens=6)
    results = evaluate_benchmarks(
        no_eos_model, tokenizer, benchmarks, eval_cfg=cfg, template="alpaca",
        max_length=64, max_prompt_length=48, out_dir=tmp_path,
    )
    summary = results["test"]
    assert summary["n"] == 3
    assert len(summary["rougeL_per_seed"]) == 2
    assert summary["rougeL_mean"] == pytest.approx(statistics.fmean(summary["rougeL_per_seed"]))
    assert summary["rougeL_std"] == pytest.approx(statistics.pstdev(summary["rougeL_per_seed"]))
    assert 0.0 <= summary["exact_match_mean"] <= 100.0

    assert json.loads((tmp_path / "test.json").read_text()) == summary
    lines = [json.loads(line) for line in (tmp_path / "test.generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 2
    assert {tuple(sorted(line)) for line in lines} == {("output", "prompt", "references", "rougeL", "seed")}
    for seed, per_seed in zip([10, 20], summary["rougeL_per_seed"]):
        mine = [line for line in lines if line["seed"] == seed]
        assert statistics.fmean(line["rougeL"] for line in mine) == pytest.approx(per_seed)
        assert [line["rougeL"] for line in mine] == pytest.approx(
            rouge_l_scores([line["output"] for line in mine], [line["references"] for line in mine])
        )
    assert [line["references"] for line in lines[:3]] == [["red"], ["hello world", "hi"], ["the quick brown fox"]]
    # the same seed gives the same generations as a direct generate call (the protocol is just generate + score)
    direct = generate(no_eos_model, tokenizer, [line["prompt"] for line in lines[:3]], batch_size=2,
                      max_new_tokens=6, max_length=64, max_prompt_length=48, seed=10, progress=False)
    assert [line["output"] for line in lines[:3]] == direct


def test_evaluate_benchmarks_scores_its_own_greedy_output_as_perfect_match(no_eos_model, tokenizer, tmp_path):
    records = make_records([["x"], ["x"], ["x"]])
    common = dict(template="alpaca", max_length=64, max_prompt_length=48)
    cfg = eval_cfg(seeds=[1], do_sample=False, max_new_tokens=6, write_generations=False)
    first = evaluate_benchmarks(no_eos_model, tokenizer, {"b": records}, eval_cfg=cfg, out_dir=tmp_path, **common)
    assert first["b"]["exact_match_mean"] == 0.0
    assert not (tmp_path / "b.generations.jsonl").exists() and (tmp_path / "b.json").exists()
    # re-run with the greedy outputs as references: every example must match exactly
    prompts = [render_prompt(r, "alpaca", tokenizer) for r in records]
    outputs = generate(no_eos_model, tokenizer, prompts, do_sample=False, max_new_tokens=6,
                       max_length=64, max_prompt_length=48, progress=False)
    again = evaluate_benchmarks(no_eos_model, tokenizer, {"b": make_records([[o] for o in outputs])},
                                eval_cfg=cfg, out_dir=None, **common)
    assert again["b"]["exact_match_mean"] == 100.0
    assert again["b"]["rougeL_std"] == 0.0  # one seed


def test_evaluate_benchmarks_caps_examples(no_eos_model, tokenizer):
    cfg = eval_cfg(seeds=[1], max_examples=2, max_new_tokens=2)
    out = evaluate_benchmarks(no_eos_model, tokenizer, {"t": make_records([["a"], ["b"], ["c"]])}, eval_cfg=cfg,
                              template="alpaca", max_length=64, max_prompt_length=48, out_dir=None)
    assert out["t"]["n"] == 2


def test_evaluate_benchmarks_rejects_empty_benchmark_and_bad_cfg(model, tokenizer):
    common = dict(template="alpaca", max_length=64, max_prompt_length=48, out_dir=None)
    with pytest.raises(ValueError, match="selfinst"):
        evaluate_benchmarks(model, tokenizer, {"selfinst": []}, eval_cfg=eval_cfg(), **common)
    bad = dict(eval_cfg(seeds=[1]))
    del bad["top_k"]
    with pytest.raises(ValueError, match="top_k"):
        evaluate_benchmarks(model, tokenizer, {"t": make_records([["a"]])}, eval_cfg=bad, **common)


# ----------------------------------------------------------------------------------------------------
# teacher_forced_metrics


def make_batches(tokenizer, texts_per_batch, prompt_tokens=2):
    """Right-padded batches whose labels mask padding and the first `prompt_tokens` tokens."""
    batches = []
    for texts in texts_per_batch:
        enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        labels[:, :prompt_tokens] = -100
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def manual_ce(model, batches):
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logp = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.log_softmax(-1)
            for i in range(b["labels"].shape[0]):
                for t in range(1, b["labels"].shape[1]):
                    if b["labels"][i, t] != -100:
                        total -= logp[i, t - 1, b["labels"][i, t]].item()
                        count += 1
    return total / count, count


def test_teacher_forced_ce_matches_manual_and_is_batching_invariant(model, tokenizer):
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[2] + " red green blue"]
    split = make_batches(tokenizer, [texts[:2], texts[2:]])
    whole = make_batches(tokenizer, [texts])
    expected_ce, expected_tokens = manual_ce(model, split)
    got = teacher_forced_metrics(model, split)
    assert set(got) == {"ce", "tokens"}
    assert got["tokens"] == expected_tokens
    assert got["ce"] == pytest.approx(expected_ce, rel=1e-5)
    assert teacher_forced_metrics(model, whole)["ce"] == pytest.approx(expected_ce, rel=1e-5)


def test_teacher_forced_kl_is_zero_against_itself_and_positive_otherwise(model, tokenizer):
    batches = make_batches(tokenizer, [PROMPTS[:2], PROMPTS[2:]])
    same = teacher_forced_metrics(model, batches, teacher=model)
    assert same["fkl"] == pytest.approx(0.0, abs=1e-6) and same["rkl"] == pytest.approx(0.0, abs=1e-6)
    other = make_model(tokenizer, seed=1)
    got = teacher_forced_metrics(model, batches, teacher=other)
    assert got["fkl"] > 0 and got["rkl"] > 0 and got["fkl"] != pytest.approx(got["rkl"])
    # exact aggregation: one batch of everything gives the same token-weighted means
    whole = teacher_forced_metrics(model, make_batches(tokenizer, [PROMPTS]), teacher=other)
    assert whole["fkl"] == pytest.approx(got["fkl"], rel=1e-5) and whole["rkl"] == pytest.approx(got["rkl"], rel=1e-5)


def test_teacher_forced_fkl_matches_manual(model, tokenizer):
    other = make_model(tokenizer, seed=1)
    batches = make_batches(tokenizer, [PROMPTS])
    b = batches[0]
    with torch.no_grad():
        ls = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].log_softmax(-1)
        lt = other(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].log_softmax(-1)
    mask = b["labels"][:, 1:] != -100
    fkl = (lt.exp() * (lt - ls)).sum(-1)[mask].mean().item()
    rkl = (ls.exp() * (ls - lt)).sum(-1)[mask].mean().item()
    got = teacher_forced_metrics(model, batches, teacher=other)
    assert got["fkl"] == pytest.approx(fkl, rel=1e-4) and got["rkl"] == pytest.approx(rkl, rel=1e-4)


def test_teacher_forced_restores_modes_and_rejects_no_tokens(tokenizer):
    student, teacher = make_model(tokenizer), make_model(tokenizer, seed=1)
    student.train()
    teacher.eval()
    teacher_forced_metrics(student, make_batches(tokenizer, [PROMPTS]), teacher=teacher)
    assert student.training and not teacher.training
    empty = make_batches(tokenizer, [PROMPTS], prompt_tokens=100)
    with pytest.raises(ValueError):
        teacher_forced_metrics(student, empty)


def test_teacher_forced_fully_masked_batch_adds_nothing(model, tokenizer):
    other = make_model(tokenizer, seed=1)
    batches = make_batches(tokenizer, [PROMPTS])
    masked = make_batches(tokenizer, [PROMPTS[:2]], prompt_tokens=100)  # still forwarded, scores no token
    assert teacher_forced_metrics(model, batches + masked, teacher=other) == pytest.approx(
        teacher_forced_metrics(model, batches, teacher=other)
    )


def test_teacher_forced_metrics_allow_empty_returns_zero_tokens():
    import torch as _torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16))
    batch = {"input_ids": _torch.ones(1, 4, dtype=_torch.long), "attention_mask": _torch.ones(1, 4, dtype=_torch.long),
             "labels": _torch.full((1, 4), -100)}
    with pytest.raises(ValueError, match="no scored tokens"):
        teacher_forced_metrics(model, [batch])
    m = teacher_forced_metrics(model, [batch], teacher=model, allow_empty=True)
    assert m == {"ce": 0.0, "tokens": 0, "fkl": 0.0, "rkl": 0.0}
