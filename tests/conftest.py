"""Shared fixtures: the job's config composed once per test, outputs under pytest's tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# No test may reach the network: W&B offline, hub offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose the job config like `distill-train` would, without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One data dir for the whole session: the embedded suite is generated once and reused (cached)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def smoke_cfg(tmp_path, data_root):
    """Factory: the experiment=smoke config with outputs in this test's tmp dir."""

    def make(*overrides: str):
        return compose(["experiment=smoke", f"paths.root={tmp_path}", f"paths.data_dir={data_root}", *overrides])

    return make


def byte_bpe_tokenizer(corpus: list[str], vocab_size: int, special_tokens: list[str], eos: str, pad: str):
    """A byte-level BPE trained in a blink on `corpus`, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Distinct eos and pad tokens, trained on a few instruction-like lines."""
    return byte_bpe_tokenizer(["the cat sat on the mat", "Instruction: add 12 and 30.", "Response: 42"] * 5,
                              300, ["<|pad|>", "<|endoftext|>"], eos="<|endoftext|>", pad="<|pad|>")
