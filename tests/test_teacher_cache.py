import multiprocessing as mp

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from distill import teacher_cache as tc
from distill.data import Record, collate_train, encode_example


def _examples(tokenizer, n=10):
    recs = [Record(instruction=f"add {i} and {i + 1}", outputs=(f"The answer is {2 * i + 1}.", str(2 * i + 1)))
            for i in range(n)]
    return [encode_example(tokenizer, r, max_length=64, max_prompt_length=48, target_index=i) for i, r in enumerate(recs)]


@pytest.fixture
def teacher(tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=64))
    model.save_pretrained(tmp_path / "teacher")
    return model.eval(), tmp_path / "teacher"


def _build(teacher, examples, cache_dir, tok, topk=None):
    model, path = teacher
    return tc.TeacherCache.build_or_load(cache_dir, model, path, examples, pad_id=tok.pad_token_id, batch_size=3,
                                         topk=topk, device=torch.device("cpu"), dtype=torch.float32, progress=False)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_cached_log_probs_give_the_teachers_distribution_at_any_tau(teacher, tiny_tokenizer, tmp_path, tau):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path / "cache", tiny_tokenizer)
    ids = [7, 2, 5]
    batch = collate_train([examples[i] for i in ids], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        live = teacher[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cached = cache.batch_logits(ids, batch["labels"])
    mask = tc.response_positions(batch["labels"])
    assert mask.sum() > 0
    torch.testing.assert_close(torch.log_softmax(cached[mask] / tau, -1), torch.log_softmax(live[mask] / tau, -1),
                               rtol=1e-5, atol=1e-5)


def test_second_build_reuses_the_file_and_a_change_makes_a_new_one(teacher, tiny_tokenizer, tmp_path, monkeypatch):
    examples = _examples(tiny_tokenizer)
    first = _build(teacher, examples, tmp_path, tiny_tokenizer)
    monkeypatch.setattr(tc, "compute", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = _build(teacher, examples, tmp_path, tiny_tokenizer)
    assert again.key == first.key and torch.equal(again.logprobs, first.logprobs)
    with pytest.raises(AssertionError, match="recomputed"):
        _build(teacher, examples[:-1], tmp_path, tiny_tokenizer)  # other data -> other key
    assert len(list(tmp_path.glob("teacher-*.safetensors"))) == 1


def test_topk_keeps_the_head_exactly_and_the_tail_mass(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    full = _build(teacher, examples, tmp_path / "full", tiny_tokenizer)
    top = _build(teacher, examples, tmp_path / "top", tiny_tokenizer, topk=5)
    exact, approx = full.rows(3), top.rows(3)
    assert approx.shape == exact.shape
    torch.testing.assert_close(approx.exp().sum(-1), torch.ones(len(approx)), rtol=1e-5, atol=1e-5)
    head = exact.topk(5, dim=-1).indices
    torch.testing.assert_close(approx.gather(1, head), exact.gather(1, head))
    with pytest.raises(ValueError, match="teacher_cache_topk=0"):
        _build(teacher, examples, tmp_path / "bad", tiny_tokenizer, topk=0)


def test_a_stale_cache_is_detected(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    cache = _build(teacher, examples, tmp_path, tiny_tokenizer)
    other = [encode_example(tiny_tokenizer, Record(instruction="x", outputs=("a much longer answer than before",)),
                            max_length=64, max_prompt_length=48)]
    batch = collate_train(other, tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="stale cache or different encoding"):
        cache.batch_logits([0], batch["labels"])


def _race(args):
    teacher_dir, cache_dir, examples, pad_id, marker = args
    model = GPT2LMHeadModel.from_pretrained(teacher_dir)
    real = tc.compute

    def counted(*a, **k):
        with open(marker, "a") as f:
            f.write("x")
        return real(*a, **k)

    tc.compute = counted
    c = tc.TeacherCache.build_or_load(cache_dir, model, teacher_dir, examples, pad_id=pad_id, batch_size=4, topk=None,
                                      device=torch.device("cpu"), dtype=torch.float32, progress=False)
    return c.key


def test_cells_starting_together_compute_once(teacher, tiny_tokenizer, tmp_path):
    examples = _examples(tiny_tokenizer)
    marker = tmp_path / "computed"
    args = (str(teacher[1]), str(tmp_path / "cache"), examples, tiny_tokenizer.pad_token_id, str(marker))
    with mp.get_context("spawn").Pool(3) as pool:
        keys = pool.map(_race, [args] * 3)
    assert len(set(keys)) == 1
    assert marker.read_text() == "x"  # one process computed, the others waited on the lock and loaded
