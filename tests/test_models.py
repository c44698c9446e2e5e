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
