import datetime
import json
import multiprocessing as mp
import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, GPT2LMHeadModel

from distill.teachers import cache as tc
from distill.teachers.build_lock import BuildLock
from distill.losses.chunked import fused_distillation_loss
from distill.data.records import Record
from distill.data.encoding import collate_train, encode_example
from distill.losses.divergences import distillation_loss
from distill.models import output_head


def _examples(tokenizer, n=10):
    recs = [Record(instruction=f"add {i} and {i + 1}", outputs=(f"The answer is {2 * i + 1}.", str(2 * i + 1)))
            for i in range(n)]
    return [encode_example(tokenizer, r, max_length=64, max_prompt_length=48, target_index=i) for i, r in enumerate(recs)]


def _save(model, path):
    model.save_pretrained(path)
    return model.eval(), path


@pytest.fixture
def teacher(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=64))
    return _save(model, tmp_path / "teacher")


def _build(teacher, examples, cache_dir, tok, kind="logits", topk=None, dtype=torch.float32, **kw):
    model, path = teacher
    return tc.TeacherCache.build_or_load(cache_dir, model, path, examples, pad_id=tok.pad_token_id, batch_size=3,
                                         kind=kind, topk=topk, device=torch.device("cpu"), dtype=dtype,
                                         progress=False, **kw)


def _batch(examples, ids, tok):
    return collate_train([examples[i] for i in ids], tok.pad_token_id)


def _live_logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------------------
# the hidden-state form: exact


def test_hidden_cache_gives_the_live_teachers_logits_in_fp32(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path / "cache", tiny_tokenizer, kind="hidden")
    assert cache.kind == "hidden" and cache.dtype == torch.float32 and cache.hidden_size == 32
    ids = [7, 2, 5]
    batch = _batch(examples, ids, tiny_tokenizer)
    live = _live_logits(teacher[0], batch)
    cached = output_head(teacher[0]).logits(cache.batch_hidden(ids, batch["labels"]))
    mask = tc.response_positions(batch["labels"])
    assert mask.sum() > 0
    torch.testing.assert_close(cached[mask], live[mask], rtol=1e-5, atol=1e-5)


def test_hidden_cache_in_bf16_is_within_bf16_rounding(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer),
                                       n_positions=64)).to(torch.bfloat16)
    teacher = _save(model, tmp_path / "teacher")
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path / "cache", tiny_tokenizer, kind="hidden", dtype=torch.bfloat16)
    assert cache.dtype == torch.bfloat16
    ids = [1, 9, 4]
    batch = _batch(examples, ids, tiny_tokenizer)
    live = _live_logits(model, batch).float()
    cached = output_head(model).logits(cache.batch_hidden(ids, batch["labels"])).float()
    mask = tc.response_positions(batch["labels"])
    # bf16 keeps 8 bits of mantissa: one rounding step is 2^-8 relative (the head's matmul may round differently
    # on a batch of rows than on the whole sequence).
    err = (cached[mask] - live[mask]).abs()
    assert (err <= 2 ** -7 * live[mask].abs().clamp_min(1.0)).all(), err.max()


def test_softcapped_teacher_through_the_hidden_cache_and_the_fused_loss(tiny_tokenizer, tmp_path):
    """Gemma 2 caps its logits (cap * tanh(z / cap)): the head applied to the cached states must do the same."""
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                       head_dim=16, intermediate_size=64, vocab_size=len(tiny_tokenizer), final_logit_softcapping=0.1)
    teacher = _save(AutoModelForCausalLM.from_config(cfg), tmp_path / "gemma")
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path / "cache", tiny_tokenizer, kind="hidden")
    ids = [0, 3, 8]
    batch = _batch(examples, ids, tiny_tokenizer)
    live = _live_logits(teacher[0], batch)
    mask = tc.response_positions(batch["labels"])
    head = output_head(teacher[0])
    assert head.transform.softcap == pytest.approx(0.1) and live.abs().max() <= 0.1
    t_hidden = cache.batch_hidden(ids, batch["labels"])
    torch.testing.assert_close(head.logits(t_hidden)[mask], live[mask], rtol=1e-5, atol=1e-6)

    # The fused loss with the cached teacher states = the plain loss with the live teacher's logits.
    g = torch.Generator().manual_seed(3)
    s_hidden, s_weight = torch.randn(*mask.shape, 16, generator=g), torch.randn(len(tiny_tokenizer), 16, generator=g)
    want = distillation_loss(s_hidden @ s_weight.T, live, mask, divergence="fkl", tau=2.0)
    got = fused_distillation_loss(s_hidden, s_weight, t_hidden, head.weight, mask, divergence="fkl", tau=2.0,
                                  chunk_size=5, **head.loss_kwargs("teacher"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shards_cover_the_examples_like_one_file(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    one = _build(teacher, examples, tmp_path / "one", tiny_tokenizer, kind="hidden")
    many = _build(teacher, examples, tmp_path / "many", tiny_tokenizer, kind="hidden", shard_examples=3)
    assert len(list(many.root.glob("shard-*.safetensors"))) == 4
    assert len(list(one.root.glob("shard-*.safetensors"))) == 1
    assert many.positions == one.positions > 0
    for i in range(len(examples)):
        assert torch.equal(many.rows(i), one.rows(i))


def test_shard_plan_balances_ranks():
    assert tc.shard_plan(10, 1, 4) == [(0, 4), (4, 8), (8, 10)]
    plan = tc.shard_plan(15000, 8, 1024)
    assert len(plan) == 16 and plan[0] == (0, 938) and plan[-1][1] == 15000
    assert {b - a for a, b in plan[:-1]} == {938}
    assert tc.shard_plan(3, 4) == [(0, 1), (1, 2), (2, 3)]


# ---------------------------------------------------------------------------------------------------------
# forms and their sizes


def test_auto_picks_the_smaller_exact_form():
    kw = dict(dtype=torch.bfloat16)
    assert tc.resolve_kind(True, hidden_size=1600, vocab_size=50257, **kw) == "hidden"     # GPT-2 XL
    assert tc.resolve_kind("auto", hidden_size=3584, vocab_size=152064, **kw) == "hidden"  # Qwen2.5-7B
    assert tc.resolve_kind("auto", hidden_size=1024, vocab_size=300, dtype=torch.float32) == "logits"
    assert tc.resolve_kind("logits", hidden_size=1600, vocab_size=50257, **kw) == "logits"
    assert tc.resolve_kind(True, hidden_size=1600, vocab_size=50257, topk=32, **kw) == "topk"
    assert tc.resolve_kind(False, hidden_size=1600, vocab_size=50257, topk=32, **kw) is None
    with pytest.raises(ValueError, match=r"loss.teacher_cache='hiden': must be one of false, true, auto"):
        tc.resolve_kind("hiden", hidden_size=8, vocab_size=8, **kw)
    assert tc.bytes_per_position("hidden", hidden_size=1600, vocab_size=50257, **kw) == 3200
    assert tc.bytes_per_position("logits", hidden_size=1600, vocab_size=50257, **kw) == 201028
    assert tc.bytes_per_position("topk", hidden_size=1600, vocab_size=50257, topk=32, **kw) == 260


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_cached_log_probs_give_the_teachers_distribution_at_any_tau(teacher, tiny_tokenizer, tmp_path, tau):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path / "cache", tiny_tokenizer, kind="logits")
    ids = [7, 2, 5]
    batch = _batch(examples, ids, tiny_tokenizer)
    live = _live_logits(teacher[0], batch)
    cached = cache.batch_logits(ids, batch["labels"])
    mask = tc.response_positions(batch["labels"])
    torch.testing.assert_close(torch.log_softmax(cached[mask] / tau, -1), torch.log_softmax(live[mask] / tau, -1),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds logits, not hidden states"):
        cache.batch_hidden(ids, batch["labels"])


def test_topk_keeps_the_head_exactly_and_the_tail_mass(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    full = _build(teacher, examples, tmp_path / "full", tiny_tokenizer)
    top = _build(teacher, examples, tmp_path / "top", tiny_tokenizer, kind="topk", topk=5)
    exact, approx = full.rows(3), top.rows(3)
    assert approx.shape == exact.shape
    torch.testing.assert_close(approx.exp().sum(-1), torch.ones(len(approx)), rtol=1e-5, atol=1e-5)
    head = exact.topk(5, dim=-1).indices
    torch.testing.assert_close(approx.gather(1, head), exact.gather(1, head))
    with pytest.raises(ValueError, match="teacher_cache_topk=0"):
        _build(teacher, examples, tmp_path / "bad", tiny_tokenizer, kind="topk", topk=0)


# ---------------------------------------------------------------------------------------------------------
# identity: what makes a cache stale


def test_second_build_reuses_the_cache_and_each_input_makes_a_new_one(teacher, tiny_tokenizer, tmp_path,
                                                                       monkeypatch):
    examples = _examples(tiny_tokenizer)
    first = _build(teacher, examples, tmp_path, tiny_tokenizer, kind="hidden")
    real = tc._batch_values
    monkeypatch.setattr(tc, "_batch_values", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = _build(teacher, examples, tmp_path, tiny_tokenizer, kind="hidden")
    assert again.key == first.key and torch.equal(again.rows(4), first.rows(4))
    os.utime(teacher[1] / "model.safetensors", (1, 1))  # a touched file is the same teacher (content, not mtime)
    assert _build(teacher, examples, tmp_path, tiny_tokenizer, kind="hidden").key == first.key
    copy = tmp_path / "copy"
    shutil.copytree(teacher[1], copy)  # the same weights elsewhere: the same cache
    assert _build((teacher[0], copy), examples, tmp_path, tiny_tokenizer, kind="hidden").key == first.key
    for change in (dict(examples=examples[:-1]), dict(dtype=torch.bfloat16), dict(kind="logits")):
        args = {"examples": examples, "kind": "hidden", **change}
        with pytest.raises(AssertionError, match="recomputed"):
            _build(teacher, args.pop("examples"), tmp_path, tiny_tokenizer, **args)
    # Other weights: a new key.
    monkeypatch.setattr(tc, "_batch_values", real)
    other = GPT2LMHeadModel.from_pretrained(teacher[1])
    with torch.no_grad():
        other.lm_head.weight.mul_(2)  # the head alone changes: the hidden states would not, the key must
    other.save_pretrained(tmp_path / "other")
    assert _build((other, tmp_path / "other"), examples, tmp_path, tiny_tokenizer, kind="hidden").key != first.key


def test_an_interrupted_build_keeps_its_finished_shards(teacher, tiny_tokenizer, tmp_path, monkeypatch):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, kind="hidden", shard_examples=4)
    want = [cache.rows(i) for i in range(len(examples))]
    (cache.root / "index.json").unlink()  # as if killed before publishing, with the last shard missing
    next(iter(sorted(cache.root.glob("shard-*.safetensors"))[-1:])).unlink()
    seen = []
    real = tc._batch_values
    monkeypatch.setattr(tc, "_batch_values", lambda t, batch, *a: seen.append(len(batch["labels"])) or real(t, batch, *a))
    again = _build(teacher, examples, tmp_path, tiny_tokenizer, kind="hidden", shard_examples=4)
    assert seen == [2]  # only the last shard (examples 8-9) was computed again
    assert all(torch.equal(again.rows(i), w) for i, w in enumerate(want))
    assert json.loads((again.root / "index.json").read_text())["n_examples"] == len(examples)


def test_a_stale_cache_is_detected(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer, kind="hidden")
    other = [encode_example(tiny_tokenizer, Record(instruction="x", outputs=("a much longer answer than before",)),
                            max_length=64, max_prompt_length=48)]
    batch = collate_train(other, tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="stale cache or different encoding"):
        cache.batch_hidden([0], batch["labels"])


def test_a_teacher_without_files_is_refused(teacher, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="cannot find the files of model.teacher.path=no/such-model"):
        _build((teacher[0], "no/such-model"), _examples(tiny_tokenizer), tmp_path, tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------------
# concurrency


def _race(args):
    teacher_dir, cache_dir, examples, pad_id, marker = args
    model = GPT2LMHeadModel.from_pretrained(teacher_dir)
    real = tc._batch_values

    def counted(*a, **k):
        with open(marker, "a") as f:
            f.write("x")
        return real(*a, **k)

    tc._batch_values = counted
    c = tc.TeacherCache.build_or_load(cache_dir, model, teacher_dir, examples, pad_id=pad_id, batch_size=20,
                                      kind="hidden", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    return c.key


def test_cells_starting_together_compute_once(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    marker = tmp_path / "computed"
    args = (str(teacher[1]), str(tmp_path / "cache"), examples, tiny_tokenizer.pad_token_id, str(marker))
    with mp.get_context("spawn").Pool(3) as pool:
        keys = pool.map(_race, [args] * 3)
    assert len(set(keys)) == 1
    assert marker.read_text() == "x"  # one process computed (one batch), the others waited on the lock and loaded


def _two_ranks(rank, teacher_dir, cache_dir, examples, pad_id, port, out_dir, phase):
    """One of two gloo ranks opening the cache together; writes what it wrote or the error it stopped with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    written = []
    real = tc._save_atomic
    tc._save_atomic = lambda tensors, path, meta: written.append(path.name) or real(tensors, path, meta)
    if phase == "refuse" and rank == 0:  # rank 0 cannot create the lock file (a read-only cache dir)
        BuildLock.acquire = lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(self.path)))
    result = {"written": written}
    try:
        tc.TeacherCache.build_or_load(cache_dir, GPT2LMHeadModel.from_pretrained(teacher_dir), teacher_dir, examples,
                                      pad_id=pad_id, batch_size=3, kind="hidden", device=torch.device("cpu"),
                                      dtype=torch.float32, progress=False, shard_examples=4)
    except tc.InputError as exc:
        result["error"] = str(exc)
    with open(os.path.join(out_dir, f"{phase}-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _run_two_ranks(teacher, examples, tmp_path, tok, phase):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    args = (str(teacher[1]), str(tmp_path / "cache"), examples, tok.pad_token_id, port, str(tmp_path), phase)
    procs = [ctx.Process(target=_two_ranks, args=(r, *args)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    return [json.loads((tmp_path / f"{phase}-{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_repair_the_damaged_shards_together_and_stop_together_when_rank0_cannot(teacher, tiny_tokenizer,
                                                                                          tmp_path):
    """Rank 0 verifies and says which shards to rebuild; the ranks share them; when rank 0 cannot (no writable
    dir), every rank stops with one line instead of waiting for it."""
    examples = _examples(tiny_tokenizer)
    built = _run_two_ranks(teacher, examples, tmp_path, tiny_tokenizer, "build")
    names = sorted(n for r in built for n in r["written"])
    assert len(names) == 4 and all(len(r["written"]) == 2 for r in built)  # shards 0-3, 3-6, 6-9, 9-10
    [root] = (tmp_path / "cache").glob("teacher-*/")
    want = {n: {k: v.clone() for k, v in load_file(str(root / n)).items()} for n in names}
    (root / names[1]).unlink()
    (root / names[3]).write_bytes(b"damaged")
    repaired = _run_two_ranks(teacher, examples, tmp_path, tiny_tokenizer, "repair")
    assert [r["written"] for r in repaired] == [[names[1]], [names[3]]]  # one each
    for n in names:  # the same values (not the same bytes: safetensors orders the metadata as it likes)
        got = load_file(str(root / n))
        assert got.keys() == want[n].keys() and all(torch.equal(got[k], want[n][k]) for k in got)
    (root / names[3]).write_bytes(b"damaged")
    refused = _run_two_ranks(teacher, examples, tmp_path, tiny_tokenizer, "refuse")
    assert "is not writable" in refused[0]["error"] and names[3] in refused[0]["error"]
    assert "rank 0 could not open or build it" in refused[1]["error"]
    assert all(r["written"] == [] for r in refused)
