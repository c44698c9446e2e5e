import pytest
import torch
from omegaconf import OmegaConf

from distill import models


def _cfg(**kw):
    base = {"name": "toy", "kind": "toy", "arch": "gpt2", "trust_remote_code": False,
            "teacher": {"path": None, "n_layer": 2, "n_embd": 64, "n_head": 2},
            "student": {"path": None, "n_layer": 2, "n_embd": 32, "n_head": 2}}
    base.update(kw)
    return OmegaConf.create(base)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_toy_models_are_built_from_sizes_on_the_tokenizer_vocab(arch, tiny_tokenizer):
    cfg = _cfg(arch=arch)
    student = models.build_model(cfg, "student", tiny_tokenizer, torch.float32, max_length=64, seed=0)
    teacher = models.build_model(cfg, "teacher", tiny_tokenizer, torch.float32, max_length=64, seed=1)
    assert student.get_output_embeddings().weight.shape == (len(tiny_tokenizer), 32)
    assert teacher.get_output_embeddings().weight.shape == (len(tiny_tokenizer), 64)
    assert models.count_params(teacher) > models.count_params(student)
    assert student.config.use_cache is False
    models.check_vocab(student, teacher, tiny_tokenizer)


def test_same_seed_same_init(tiny_tokenizer):
    a = models.build_model(_cfg(), "student", tiny_tokenizer, torch.float32, 64, seed=3)
    b = models.build_model(_cfg(), "student", tiny_tokenizer, torch.float32, 64, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_hf_path_loads_local_dirs_offline(tmp_path, tiny_tokenizer):
    """The hub-loading path (`from_pretrained`) against local fixture dirs: no network needed."""
    toy = _cfg()
    for role in ("teacher", "student"):
        m = models.build_model(toy, role, tiny_tokenizer, torch.float32, 64, seed=0)
        m.save_pretrained(tmp_path / role)
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").exists()  # weights-only format
    cfg = _cfg(kind="hf", teacher={"path": str(tmp_path / "teacher")}, student={"path": str(tmp_path / "student")})
    student = models.build_model(cfg, "student", tiny_tokenizer, torch.bfloat16, 64, seed=0)
    assert student.dtype == torch.bfloat16
    tok = models.load_tokenizer(tmp_path / "student")
    assert tok.pad_token_id is not None and len(tok) == len(tiny_tokenizer)


def test_hf_kind_requires_a_path(tiny_tokenizer):
    with pytest.raises(ValueError, match="model.student.path is required"):
        models.build_model(_cfg(kind="hf"), "student", tiny_tokenizer, torch.float32, 64, seed=0)


def test_vocab_rule(tiny_tokenizer):
    cfg = _cfg()
    student = models.build_model(cfg, "student", tiny_tokenizer, torch.float32, 64, seed=0)
    teacher = models.build_model(cfg, "teacher", tiny_tokenizer, torch.float32, 64, seed=0)
    teacher.resize_token_embeddings(len(tiny_tokenizer) + 8)  # padded teacher vocab: allowed
    models.check_vocab(student, teacher, tiny_tokenizer)
    with pytest.raises(ValueError, match="teacher vocab .* smaller than student vocab"):
        models.check_vocab(teacher, student, tiny_tokenizer)


def test_bad_sizes_and_precision(tiny_tokenizer):
    with pytest.raises(ValueError, match="divisible"):
        models.toy_config("gpt2", {"n_layer": 1, "n_embd": 30, "n_head": 4}, tiny_tokenizer, 32)
    with pytest.raises(ValueError, match="arch='mamba'"):
        models.toy_config("mamba", {"n_layer": 1, "n_embd": 32, "n_head": 4}, tiny_tokenizer, 32)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        models.torch_dtype("fp8")


def _tiny_hf(kind: str):
    """Tiny random causal LMs whose heads differ: plain, tied/untied, scaled (Cohere), softcapped (Gemma 2),
    projected (OPT's project_out)."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config, LlamaConfig, OPTConfig

    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=97)
    cfg = {
        "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32),
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
        # a cap small enough to bite on random weights, so a missing softcap would be caught
        "gemma2": lambda: Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.05),
        "cohere": lambda: CohereConfig(**common, logit_scale=0.3),
        "opt": lambda: OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                 vocab_size=97, word_embed_proj_dim=16),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma2", "cohere", "opt"])
def test_output_head_reproduces_the_models_logits(kind):
    model = _tiny_hf(kind)
    head = models.output_head(model)
    expected = {"gemma2": (1.0, 0.05), "cohere": (0.3, None)}.get(kind, (1.0, None))
    assert (head.transform.scale, head.transform.softcap) == pytest.approx(expected)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        hidden = models.final_hidden(model, ids, mask)
        torch.testing.assert_close(head.logits(hidden), want, rtol=1e-5, atol=1e-5)
        if kind in ("gemma2", "cohere"):  # the transform matters: without it the logits differ
            assert not torch.allclose(torch.nn.functional.linear(hidden, head.weight, head.bias), want, atol=1e-3)
    models.check_output_head(model, head, "teacher")


def test_check_output_head_refuses_a_head_that_does_not_reproduce_the_logits():
    model = _tiny_hf("gpt2")
    wrong = models.OutputHead(model.get_output_embeddings(), models.LogitTransform(scale=2.0))
    with pytest.raises(ValueError, match=r"teacher's output head \(GPT2LMHeadModel.*does not reproduce its logits"):
        models.check_output_head(model, wrong, "teacher")


def test_final_hidden_keeps_the_graph_for_the_student():
    model = _tiny_hf("llama").train()
    ids = torch.randint(0, 97, (2, 5))
    hidden = models.final_hidden(model, ids)
    assert hidden.shape == (2, 5, 32) and hidden.requires_grad
    hidden.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
