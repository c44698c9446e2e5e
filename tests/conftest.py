"""Shared fixtures: the job's config composed once per test, outputs under pytest's tmp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach the network: W&B offline, hub offline (set before anything imports transformers or wandb).
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

from distill.config import compose  # noqa: E402 (the tests' way to build the job's config)

# LOCAL_RANK stays: DeepSpeed's engine reads it from the environment in every later in-process job, and a
# child without RANK sets all five itself (engine.setup_distributed).
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous_env():
    """Forget the rendezvous variables an in-process job exported once its test ends.

    The first in-process job initialises torch.distributed in pytest's own process (the group lives on, its
    TCPStore holding MASTER_PORT) and exports RANK, MASTER_PORT... for DeepSpeed. A `distill-train` subprocess
    started by a later test would inherit them and try to listen on that very port (EADDRINUSE in CI).
    """
    before = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


@pytest.fixture(scope="session")
def alpaca_tokenizer():
    """The embedded suite's recipe (byte-level BPE with EOS, PAD and a chat template) on Alpaca-style lines."""
    from distill.data.encoding import ALPACA_PROMPT_INPUT
    from distill.data.embedded import train_tokenizer

    text = [ALPACA_PROMPT_INPUT.format(instruction="Add 12 and 30.", input="12 30") + "The answer is 42."] * 20
    return train_tokenizer(text + ["the cat sat on the mat, 160 times\n"] * 20, 300)
