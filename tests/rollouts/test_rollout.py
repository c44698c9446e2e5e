"""Rollouts, piece by piece: masking of generated responses, seeded batched sampling, DistiLLM's SGO rules
(checked against a transcription of their finetune.py loop), the replay buffer and its checkpoint state,
the seq-KD cache, and generation under ZeRO-3 against ZeRO-0 with the same weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel

from distill.rollouts import rollout as ro
from distill.rollouts import sampling, seq_kd
from distill.data.records import Record
from distill.data.encoding import IGNORE_INDEX, encode_example
from tests.conftest import compose

EOS, PAD = 7, 0
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": None, "no_repeat_ngram_size": 0}


# ---------------------------------------------------------------------------------------------- masking

def test_response_is_cut_after_its_first_eos_which_is_labelled_once():
    ex = sampling.response_example([1, 2, 3], [4, 5, EOS, 9, EOS, PAD], eos_id=EOS, max_length=50)
    assert ex["input_ids"] == [1, 2, 3, 4, 5, EOS]
    assert ex["labels"] == [IGNORE_INDEX] * 3 + [4, 5, EOS]
    assert ex["prompt_length"] == 3


def test_response_without_eos_keeps_every_token_and_is_capped_at_max_length():
    assert sampling.response_example([1, 2], [4, 5, 6], eos_id=EOS, max_length=50)["labels"] == [IGNORE_INDEX] * 2 + [4, 5, 6]
    capped = sampling.response_example([1, 2], [4, 5, 6, EOS], eos_id=EOS, max_length=4)
    assert capped["input_ids"] == [1, 2, 4, 5] and capped["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 4, 5]


def test_pad_equal_to_eos_still_labels_one_eos():
    # GPT-2 style: HF pads finished rows with EOS itself
    ex = sampling.response_example([1], [4, EOS, EOS, EOS], eos_id=EOS, max_length=50)
    assert ex["labels"] == [IGNORE_INDEX, 4, EOS]


def test_generated_examples_collate_to_the_response_mask_of_references(tiny_tokenizer):
    from distill.data.encoding import collate_train

    eos = tiny_tokenizer.eos_token_id
    gen = [sampling.response_example([5, 6, 7], [8, eos], eos_id=eos, max_length=20),
           sampling.response_example([5], [8, 9, 10, 11], eos_id=eos, max_length=20)]
    batch = collate_train(gen, tiny_tokenizer.pad_token_id)
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    # row 0: positions 2, 3 predict 8 and EOS; row 1: positions 0..3 predict 8..11; nothing else
    assert scored.tolist() == [[False, False, True, True], [True, True, True, True]]


# ---------------------------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def tok():
    from tests.conftest import byte_bpe_tokenizer

    corpus = ["the quick brown fox jumps over the lazy dog", "add 12 and 30. The answer is 42."] * 20
    return byte_bpe_tokenizer(corpus, 300, ["<|endoftext|>", "<pad>"], eos="<|endoftext|>", pad="<pad>")


def tiny_lm(tok, seed=0, eos_bias=0.0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=96, n_layer=2, n_embd=32, n_head=2,
                                       initializer_range=0.3, eos_token_id=tok.eos_token_id,
                                       bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    if eos_bias:  # the head is tied to the embeddings: bias the EOS logit through a hook
        bias = torch.zeros(len(tok))
        bias[tok.eos_token_id] = eos_bias
        model.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    return model.eval()


def prompts_of(tok, n=6):
    texts = ["add 1 and 2.", "the quick brown fox jumps over", "dog", "add 12 and 30. The answer", "lazy fox", "the"]
    return [tok.encode(t) for t in texts[:n]]


def _sample(model, tok, prompts, seed=0, **kw):
    return sampling.sample_examples(model, prompts, sampling={**SAMPLING, **kw.pop("sampling", {})}, seed=seed,
                              pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_length=kw.pop("max_length", 40), **kw)


def test_sampled_examples_are_masked_exactly(tok):
    model = tiny_lm(tok, eos_bias=3.0)  # EOS likely: some rows stop early, others run to the limit
    prompts = prompts_of(tok)
    out = _sample(model, tok, prompts, seed=3)
    eos = tok.eos_token_id
    ended = 0
    for p, ex in zip(prompts, out):
        n = len(p)
        assert ex["input_ids"][:n] == p and ex["prompt_length"] == n
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        response = ex["labels"][n:]
        assert response == ex["input_ids"][n:] and len(response) >= 1 and IGNORE_INDEX not in response
        assert response.count(eos) <= 1 and (eos not in response or response[-1] == eos)
        assert len(ex["input_ids"]) <= 40
        ended += response[-1] == eos
    assert 0 < ended  # the EOS path was exercised


def test_sampling_is_seeded_and_leaves_the_callers_rng_alone(tok):
    model = tiny_lm(tok)
    prompts = prompts_of(tok)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _sample(model, tok, prompts, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == _sample(model, tok, prompts, seed=1)
    assert a != _sample(model, tok, prompts, seed=2)


def test_left_padded_batch_equals_one_prompt_at_a_time(tok):
    # top_k=1 makes sampling deterministic: any difference would come from padding or positions
    model = tiny_lm(tok)
    prompts = prompts_of(tok)
    greedy = {"top_k": 1, "max_new_tokens": 8}
    batched = _sample(model, tok, prompts, sampling=greedy)
    alone = [_sample(model, tok, [p], sampling=greedy)[0] for p in prompts]
    assert batched == alone


def test_max_new_tokens_and_sampling_knobs_reach_generate(tok):
    model = tiny_lm(tok, eos_bias=-1e9)  # never stops early
    out = _sample(model, tok, prompts_of(tok, 2), sampling={"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9})
    assert [len(e["input_ids"]) - e["prompt_length"] for e in out] == [5, 5]


# ---------------------------------------------------------------------------------------------- SGO vs DistiLLM

def distillm_threshold_trace(init_threshold, loss_eps, dev_losses):
    """DistiLLM finetune.py, transcribed: prev_avg_loss = evaluate(...) before training; after each
    evaluation `if curr_avg_loss >= prev_avg_loss + args.loss_eps: adaptive_threshold += 0.1;
    adaptive_threshold = min(adaptive_threshold, 1.0); prev_avg_loss = curr_avg_loss`."""
    adaptive_threshold = init_threshold
    prev_avg_loss = dev_losses[0]
    trace = []
    for curr_avg_loss in dev_losses[1:]:
        if curr_avg_loss >= prev_avg_loss + loss_eps:
            adaptive_threshold += 0.1
            adaptive_threshold = min(adaptive_threshold, 1.0)
            prev_avg_loss = curr_avg_loss
        trace.append(adaptive_threshold)
    return trace


def distillm_branch(r, adaptive_threshold, replay_ratio, global_step, total_iters, buffer_len, capacity):
    """DistiLLM finetune.py's per-micro-batch branch for `adaptive` types, transcribed."""
    samp_threshold = adaptive_threshold * (1 - global_step / total_iters)
    if replay_ratio == "constant":
        samp_threshold = adaptive_threshold * 0.5
    elif replay_ratio == "increasing":
        samp_threshold = adaptive_threshold * global_step / total_iters
    else:
        samp_threshold = adaptive_threshold * (1 - global_step / total_iters)
    if r < samp_threshold or (r < adaptive_threshold and buffer_len < capacity):
        return "generated"
    elif r < adaptive_threshold:
        return "replayed"
    return "offline"


@given(st.floats(0, 1), st.floats(0, 0.5), st.lists(st.floats(0, 5), min_size=2, max_size=30))
@settings(max_examples=200, deadline=None)
def test_threshold_follows_distillm(init, eps, losses):
    r = ro.Rollout({"name": "sgo", "init_threshold": init, "loss_eps": eps, "capacity": 8,
                    "replay_ratio": "decreasing", "sampling": SAMPLING}, seed=0, max_steps=10, pad_id=0, eos_id=1,
                   max_length=8)
    trace = []
    for loss in losses:
        r.observe_dev_loss(loss)
        trace.append(r.threshold)
    assert trace[1:] == distillm_threshold_trace(init, eps, losses)


@given(st.floats(0, 0.999), st.floats(0, 1), st.sampled_from(ro.REPLAY_RATIOS), st.integers(0, 99),
       st.integers(0, 20), st.integers(1, 20))
@settings(max_examples=300, deadline=None)
def test_branch_follows_distillm(r, threshold, schedule, step, buffer_len, capacity):
    fresh = ro.fresh_probability(threshold, schedule, step + 1, 100)
    assert ro.sgo_choice(r, threshold, fresh, buffer_len, capacity) == \
        distillm_branch(r, threshold, schedule, step + 1, 100, buffer_len, capacity)


def test_fresh_probability_by_hand():
    assert ro.fresh_probability(0.6, "decreasing", 3, 10) == pytest.approx(0.42)
    assert ro.fresh_probability(0.6, "constant", 3, 10) == pytest.approx(0.3)
    assert ro.fresh_probability(0.6, "increasing", 3, 10) == pytest.approx(0.18)
    with pytest.raises(ValueError, match="replay_ratio"):
        ro.fresh_probability(0.6, "sometimes", 3, 10)


def test_threshold_rises_by_a_tenth_caps_at_one_and_never_moves_the_reference_down():
    assert ro.adapt_threshold(0.2, 1.0, 1.1, 0.1) == (pytest.approx(0.3), 1.1)
    assert ro.adapt_threshold(0.2, 1.0, 1.05, 0.1) == (0.2, 1.0)
    assert ro.adapt_threshold(0.2, 1.0, 0.5, 0.1) == (0.2, 1.0)  # a falling loss keeps the old reference
    assert ro.adapt_threshold(0.95, 1.0, 2.0, 0.1) == (1.0, 2.0)


def test_on_policy_coin():
    assert ro.on_policy_choice(0.0, 0.0) == "offline" and ro.on_policy_choice(0.999, 1.0) == "generated"
    draws = [sampling.coin("coin", 0, s, 0) for s in range(2000)]
    assert 0.45 < sum(ro.on_policy_choice(d, 0.5) == "generated" for d in draws) / 2000 < 0.55


# ---------------------------------------------------------------------------------------------- replay buffer

def _ex(i, n=3):
    return {"input_ids": [i] * n, "labels": [IGNORE_INDEX] + [i] * (n - 1), "prompt_length": 1}


def test_buffer_is_a_fifo_of_capacity_and_samples_distinct_seeded():
    b = ro.ReplayBuffer(4)
    b.push([_ex(i) for i in range(6)])
    assert len(b) == 4 and [e["input_ids"][0] for e in b.items] == [2, 3, 4, 5]
    draw = b.sample(3, seed=9)
    assert len({e["input_ids"][0] for e in draw}) == 3 and draw == b.sample(3, seed=9)
    with pytest.raises(ValueError, match="cannot replay 5"):
        b.sample(5, seed=0)


def test_rollout_state_round_trips_through_safetensors_without_pickle(tmp_path):
    cfg = {"name": "sgo", "init_threshold": 0.3, "loss_eps": 0.1, "capacity": 5, "replay_ratio": "constant",
           "sampling": SAMPLING}
    a = ro.Rollout(cfg, seed=0, max_steps=10, pad_id=0, eos_id=1, max_length=8)
    a.buffer.push([_ex(i, n=2 + i) for i in range(7)])
    a.observe_dev_loss(2.0)
    a.observe_dev_loss(2.5)
    a.counts.update({"generated": 3, "replayed": 2, "offline": 1})
    path = a.save(tmp_path, rank=1)
    assert path.suffix == ".safetensors" and b"\x80" not in path.read_bytes()[:8]  # not a pickle
    b = ro.Rollout(cfg, seed=0, max_steps=10, pad_id=0, eos_id=1, max_length=8)
    b.load(tmp_path, rank=1)
    assert list(b.buffer.items) == list(a.buffer.items)
    assert (b.threshold, b.prev_loss, b.counts) == (a.threshold, a.prev_loss, a.counts)
    with pytest.raises(FileNotFoundError, match="no rollout state for rank 0"):
        b.load(tmp_path, rank=0)
    other = ro.Rollout({"name": "on_policy", "lmbda": 0.5, "sampling": SAMPLING}, seed=0, max_steps=10, pad_id=0,
                       eos_id=1, max_length=8)
    with pytest.raises(ValueError, match="rollout state is 'sgo'"):
        other.load(tmp_path, rank=1)


# ---------------------------------------------------------------------------------------------- the rollout

def _train_examples(tok, n=12):
    recs = [Record(instruction=f"add {i} and {i + 1}", outputs=(f"The answer is {2 * i + 1}.",)) for i in range(n)]
    return [encode_example(tok, r, template="alpaca_compact", max_length=40, max_prompt_length=24) for r in recs]


def _rollout(tok, cfg, seed=0, max_steps=8):
    return ro.Rollout(cfg, seed=seed, max_steps=max_steps, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                      max_length=40)


def test_lmbda_zero_gives_the_offline_micro_batches_and_one_generates_all(tok):
    train = _train_examples(tok)
    ids = [[0, 1, 2], [3, 4, 5]]
    model = tiny_lm(tok)
    offline = _rollout(tok, {"name": "offline"}).micro_batches(0, ids, train, model)
    zero = _rollout(tok, {"name": "on_policy", "lmbda": 0.0, "sampling": SAMPLING}).micro_batches(0, ids, train, model)
    assert [(m.examples, m.source, m.example_ids) for m in zero] == [(m.examples, m.source, m.example_ids) for m in offline]
    assert [m.example_ids for m in offline] == ids
    one = _rollout(tok, {"name": "on_policy", "lmbda": 1.0, "sampling": SAMPLING}).micro_batches(0, ids, train, model)
    assert [m.source for m in one] == ["generated", "generated"] and all(m.example_ids is None for m in one)
    for m, idx in zip(one, ids):  # the student answered the batch's own prompts
        assert [sampling.prompt_of(e) for e in m.examples] == [sampling.prompt_of(train[i]) for i in idx]


def test_coins_are_shared_by_ranks_and_samples_are_not(tok):
    cfg = {"name": "on_policy", "lmbda": 0.5, "sampling": SAMPLING}
    a, b = _rollout(tok, cfg), _rollout(tok, cfg)
    assert [a.choose(s, m) for s in range(20) for m in range(2)] == [b.choose(s, m) for s in range(20) for m in range(2)]
    assert sampling.derived_seed("sample", 0, 3, 0, 0) != sampling.derived_seed("sample", 0, 3, 0, 1)


def run_sgo(tok, model, train, steps, rollout, start=0, dev_losses=None):
    """Drive an SGO rollout over `steps` as the job would (2 micro-batches of 3); return the sources."""
    sources = []
    for step in range(start, steps):
        ids = [[(6 * step + k) % len(train) for k in range(3)], [(6 * step + 3 + k) % len(train) for k in range(3)]]
        sources += [m.source for m in rollout.micro_batches(step, ids, train, model)]
        if dev_losses and step in dev_losses:
            rollout.observe_dev_loss(dev_losses[step])
    return sources


def test_sgo_fills_its_buffer_then_replays_and_resumes_exactly(tok, tmp_path):
    cfg = {"name": "sgo", "init_threshold": 0.9, "loss_eps": 0.1, "capacity": 6, "replay_ratio": "decreasing",
           "sampling": {**SAMPLING, "max_new_tokens": 4}}
    train, model = _train_examples(tok), tiny_lm(tok)
    losses = {1: 2.0, 3: 2.2, 5: 2.25}
    straight = _rollout(tok, cfg, max_steps=8)
    straight.observe_dev_loss(1.9)
    all_sources = run_sgo(tok, model, train, 8, straight, dev_losses=losses)
    assert {"generated", "replayed"} <= set(all_sources)
    assert straight.threshold == pytest.approx(1.0)  # 1.9 -> 2.0 (+0.1) -> 2.2 (+0.1), capped

    first = _rollout(tok, cfg, max_steps=8)
    first.observe_dev_loss(1.9)
    part = run_sgo(tok, model, train, 4, first, dev_losses=losses)
    first.save(tmp_path, 0)
    resumed = _rollout(tok, cfg, max_steps=8)
    resumed.load(tmp_path, 0)
    rest = run_sgo(tok, model, train, 8, resumed, start=4, dev_losses=losses)
    assert part + rest == all_sources
    assert list(resumed.buffer.items) == list(straight.buffer.items)
    assert resumed.summary() == straight.summary()




# ---------------------------------------------------------------------------------------------- seq-KD cache

def test_seq_kd_samples_the_teacher_once_and_every_cell_reads_the_file(tok, tmp_path):
    teacher = tiny_lm(tok, seed=1, eos_bias=2.0)
    teacher.save_pretrained(tmp_path / "teacher")
    train = _train_examples(tok, n=5)
    cfg = {"seed": 0, "batch_size": 2, "sampling": {**SAMPLING, "max_new_tokens": 6}}
    loads = []

    def load():
        loads.append(1)
        return teacher

    kw = dict(load_teacher=load, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_length=40)
    first = seq_kd.seq_kd_examples(tmp_path / "cache", tmp_path / "teacher", train, cfg, **kw)
    again = seq_kd.seq_kd_examples(tmp_path / "cache", tmp_path / "teacher", train, cfg, **kw)
    assert first == again and len(loads) == 1 and len(list((tmp_path / "cache").glob("seqkd-*.safetensors"))) == 1
    for ex, ref in zip(first, train):
        assert sampling.prompt_of(ex) == sampling.prompt_of(ref)
        assert ex["labels"][: ex["prompt_length"]] == [IGNORE_INDEX] * ex["prompt_length"]
    assert first != [sampling.response_example(sampling.prompt_of(t), t["input_ids"][t["prompt_length"]:], eos_id=tok.eos_token_id,
                                         max_length=40) for t in train]  # the references were replaced
    seq_kd.seq_kd_examples(tmp_path / "cache", tmp_path / "teacher", train, {**cfg, "seed": 1}, **kw)
    assert len(loads) == 2  # another sampling seed is another file


# ---------------------------------------------------------------------------------------------- ZeRO-3

@pytest.mark.parametrize("stage", [3])
def test_generation_under_zero3_gathers_the_weights(tok, stage):
    """The student's ZeRO-3 engine module (parameters partitioned, gathered in each forward) samples exactly
    what the same weights sample as a plain module."""
    from distill.train import engine as eng

    eng.setup_distributed(60)
    plain = tiny_lm(tok, seed=4)
    sharded = copy.deepcopy(plain).train()
    trainer = dict(micro_batch_size=2, grad_accum=1, grad_clip=1.0, zero_stage=stage, lr=1e-3, betas=[0.9, 0.95],
                   weight_decay=0.0, precision="fp32", warmup_steps=0, max_steps=10, min_lr_ratio=0.1,
                   global_batch_size=2)
    engine = eng.initialize(sharded, trainer, 1)
    assert all(p.numel() == 0 for p in engine.module.parameters())  # really partitioned outside forwards
    prompts = prompts_of(tok)
    got = _sample(engine.module, tok, prompts, seed=5, sampling={"max_new_tokens": 6})
    assert got == _sample(plain, tok, prompts, seed=5, sampling={"max_new_tokens": 6})
    assert engine.module.training  # mode restored


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, message", [
    (["rollout=on_policy", "rollout.lmbda=1.5"], "rollout.lmbda=1.5"),
    (["rollout=on_policy", "loss.kd_ratio=0"], "needs loss.kd_ratio > 0"),
    (["rollout=sgo", "rollout.capacity=4", "trainer.eval_every=5"], "rollout.capacity=4"),
    (["rollout=sgo", "trainer.eval_every=0"], "set trainer.eval_every"),
    (["rollout=sgo", "rollout.replay_ratio=often", "trainer.eval_every=5"], "rollout.replay_ratio='often'"),
    (["rollout=seq_kd"], "rollout=seq_kd needs model.teacher.path"),
    (["rollout=on_policy", "rollout.sampling.top_p=0"], "rollout.sampling.top_p=0"),
    (["rollout=on_policy", "rollout.sampling.temperature=0"], "sampling temperature must be > 0"),
])
def test_bad_rollout_configs_are_one_line_each(overrides, message):
    from distill.config import problems

    cfg = compose(["experiment=smoke", *overrides])
    assert any(message in p for p in problems(cfg)), problems(cfg)


def test_offline_keeps_the_old_signature_and_names_tell_rollouts_apart():
    from omegaconf import OmegaConf

    from distill.cell import identity as runs

    cfg = compose(["experiment=smoke"])
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["rollout"]
    assert runs.signature(cfg) == runs.signature(old)
    assert runs.cell_name(cfg) == "fkl-tau1-toy-2x32-s0"
    on = compose(["experiment=smoke", "rollout=on_policy", "rollout.lmbda=0"])
    assert runs.cell_name(on) == "fkl-tau1-onpolicy0-toy-2x32-s0" and runs.signature(on) != runs.signature(cfg)
    assert runs.cell_name(compose(["experiment=smoke", "rollout=sgo", "divergence=skl"])) == "skl-tau1-sgo-toy-2x32-s0"
    assert runs.cell_name(compose(["experiment=smoke", "rollout=seq_kd", "loss.kd_ratio=0"])) == "sft-seqkd-toy-2x32-s0"
    assert json.dumps(runs.result_config(on)["rollout"]["lmbda"]) == "0.0"


# ---------------------------------------------------------------------------------------------- the job

def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "student" / "model.safetensors"))


def test_lmbda_zero_trains_bit_identically_to_offline(smoke_cfg, tmp_path):
    from pathlib import Path

    from distill.train.run import run_cell

    off = run_cell(smoke_cfg("eval.max_examples=2", f"paths.root={tmp_path}/off"))
    zero = run_cell(smoke_cfg("eval.max_examples=2", "rollout=on_policy", "rollout.lmbda=0", f"paths.root={tmp_path}/z"))
    assert zero["name"] == "fkl-tau1-onpolicy0-toy-2x32-s0" and zero["cell"]["rollout"] == "on_policy λ=0"
    assert zero["train"]["rollout"]["micro_batches"] == {"offline": 6, "generated": 0, "replayed": 0}
    assert zero["train"]["final_loss"] == off["train"]["final_loss"]
    w_off, w_zero = _weights(Path(off["run_dir"])), _weights(Path(zero["run_dir"]))
    assert all(torch.equal(w_off[k], w_zero[k]) for k in w_off)


ROLLOUT_CELLS = {
    # lmbda 0.5: both sources occur in 6 steps (coins of seed 0)
    "on_policy": ["rollout=on_policy", "rollout.lmbda=0.5"],
    # threshold 1 and a one-micro-batch buffer: step 0 generates (buffer empty), and with fresh = 1 - (s+1)/6 the
    # last step (fresh 0) must replay what was generated before the kill
    "sgo": ["rollout=sgo", "rollout.init_threshold=1.0", "rollout.capacity=8", "divergence=skl"],
}


@pytest.mark.parametrize("rollout", sorted(ROLLOUT_CELLS))
def test_killed_rollout_cell_resumes_like_the_unkilled_one(rollout, smoke_cfg, tmp_path, monkeypatch):
    """An on-policy and an SGO smoke cell end to end, and killed after the checkpoint at step 3 then resumed:
    the same weights, loss and rollout counters (replay buffer, threshold and draws restored)."""
    from pathlib import Path

    from distill.train import engine as eng
    from distill.cell import fingerprints as inputs
    from distill.train.run import run_cell

    common = [*ROLLOUT_CELLS[rollout], "eval.max_examples=2", "rollout.sampling.max_new_tokens=12"]
    straight = run_cell(smoke_cfg(*common, f"paths.root={tmp_path}/straight"))
    assert straight["status"] == "completed" and straight["cell"]["rollout"] != "offline"
    counts = straight["train"]["rollout"]["micro_batches"]
    assert counts["generated"] >= 1 and counts["offline" if rollout == "on_policy" else "replayed"] >= 1, counts
    assert straight["train"]["rollout"]["generated_tokens"] > 0
    log = (Path(straight["run_dir"]) / "train_log.jsonl").read_text()
    assert "rollout/generated_frac" in log
    if rollout == "sgo":
        assert straight["name"] == "skl-tau1-sgo-toy-2x32-s0" and straight["train"]["rollout"]["buffer"] == 8
        assert '"valid/ce"' in log.splitlines()[0]  # the dev loss before training (DistiLLM's reference)

    real_save = eng.save_checkpoint

    def save_then_die(engine, run_dir, step, client_state, keep):
        real_save(engine, run_dir, step, client_state, keep)
        raise RuntimeError(f"killed after checkpoint at step {step}")

    cfg = smoke_cfg(*common, f"paths.root={tmp_path}/resumed")
    monkeypatch.setattr(eng, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed after checkpoint at step 3"):
        run_cell(cfg)
    ckpt = eng.checkpoint_dir(inputs.locate(cfg)[0], 3)
    assert (ckpt / "rollout-rank00000.safetensors").exists()
    monkeypatch.setattr(eng, "save_checkpoint", real_save)
    resumed = run_cell(cfg)
    assert resumed["train"]["resumed_from_step"] == 3
    assert resumed["train"]["rollout"] == straight["train"]["rollout"]
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-6)
    w_a, w_b = _weights(Path(straight["run_dir"])), _weights(Path(resumed["run_dir"]))
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-6, atol=1e-7)


def test_seq_kd_cells_share_one_file_of_teacher_samples(smoke_cfg, tmp_path):
    from pathlib import Path

    from distill.train.run import run_cell

    teacher = run_cell(smoke_cfg("experiment=[smoke,teacher]", "eval.max_examples=2", f"paths.root={tmp_path}/t"))
    t_dir = Path(teacher["run_dir"]) / "student"
    common = [f"model.teacher.path={t_dir}", "model.teacher.allow_random=false", "rollout=seq_kd",
              "rollout.sampling.max_new_tokens=12", "eval.max_examples=2"]
    seqkd = run_cell(smoke_cfg(*common, "loss.kd_ratio=0"))          # classic SeqKD: CE on the teacher's samples
    word = run_cell(smoke_cfg(*common, "divergence=rkl", "tau=2"))   # + the token-level divergence on them
    assert seqkd["name"] == "sft-seqkd-toy-2x32-s0" and word["name"] == "rkl-tau2-seqkd-toy-2x32-s0"
    assert seqkd["status"] == word["status"] == "completed" and word["cell"]["rollout"] == "seq_kd"
    assert len(list((tmp_path / "cache").glob("seqkd-*.safetensors"))) == 1


ZERO3_WORKER = """
import json, os, sys, copy
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from distill.train import engine as eng
from distill.rollouts.sampling import sample_examples

rank, world = eng.setup_distributed(120)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_layer=2, n_embd=32, n_head=2, eos_token_id=7,
                                   bos_token_id=7, pad_token_id=0)).eval()
bias = torch.zeros(64)
bias[7] = 50.0 if rank == 0 else -50.0   # rank 0 stops after one token, rank 1 never stops early
model.lm_head.register_forward_hook(lambda m, a, out: out + bias)
plain = copy.deepcopy(model)
trainer = dict(micro_batch_size=2, grad_accum=1, grad_clip=1.0, zero_stage=3, lr=1e-3, betas=[0.9, 0.95],
               weight_decay=0.0, precision="fp32", warmup_steps=0, max_steps=10, min_lr_ratio=0.1,
               global_batch_size=2 * world)
engine = eng.initialize(model, trainer, world)
prompts = [[1, 2, 3, 4], [5, 6]] if rank == 0 else [[9, 10, 11], [12]]
kw = dict(sampling={"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 10}, seed=rank, pad_id=0, eos_id=7,
          max_length=40)
sharded = sample_examples(engine.module, prompts, synced_gpus=True, **kw)
alone = sample_examples(plain, prompts, **kw)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"sharded": sharded, "plain": alone}, f)
"""


@pytest.mark.slow
def test_two_ranks_generate_under_zero3_when_one_stops_first(tmp_path):
    """Two ranks sample under ZeRO-3 (every forward gathers the shards: a collective). Rank 0's rows stop at
    once, rank 1's never: with `synced_gpus` rank 0 keeps joining rank 1's forwards instead of hanging, and each
    rank's samples equal what its plain (unsharded) copy of the weights samples."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(ZERO3_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["sharded"] == r["plain"]
    assert [len(e["input_ids"]) - e["prompt_length"] for e in r0["sharded"]] == [1, 1]    # EOS at once
    assert [len(e["input_ids"]) - e["prompt_length"] for e in r1["sharded"]] == [10, 10]  # ran to the limit
