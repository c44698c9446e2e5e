"""Teacher/student pairs: tiny toy models built from sizes, or real ones from the Hugging Face hub.

Everything loads weights-only (safetensors, which `save_pretrained` writes by default), and
`trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(_DTYPES)  # trainer.precision / model.dtype values (fp16: GPU only)


def torch_dtype(name: str) -> torch.dtype:
    """`fp32|bf16|fp16` -> torch dtype."""
    if name not in _DTYPES:
        raise ValueError(f"precision {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (GPT-2-style tokenizers ship without a pad token)."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def toy_config(arch: str, sizes: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int):
    """A small GPT-2 or Llama config sized by `sizes` (n_layer, n_embd, n_head) on `tokenizer`'s vocab."""
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    n_layer, n_embd, n_head = int(sizes["n_layer"]), int(sizes["n_embd"]), int(sizes["n_head"])
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    if arch == "gpt2":
        from transformers import GPT2Config

        # No dropout: tiny models on small data, and it keeps resume bit-exact. The tanh GELU as one
        # torch op: GPT-2's default "gelu_new" is several Python-level ops, slow on CPU.
        return GPT2Config(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=max_length,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh", **common,
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head,
            num_key_value_heads=n_head, intermediate_size=4 * n_embd,
            max_position_embeddings=max_length, tie_word_embeddings=True, **common,
        )
    raise ValueError(f"model.arch={arch!r} is not one of ['gpt2', 'llama']")


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """`from_pretrained` a local dir or hub id (weights-only: safetensors preferred)."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code
    )


def build_model(
    model_cfg: Mapping[str, Any],
    role: str,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    max_length: int,
    seed: int,
) -> PreTrainedModel:
    """Build the `role` ("teacher"|"student") model: load its `path` if set, else init a toy model."""
    spec = model_cfg[role]
    path = spec.get("path")
    trust = bool(model_cfg.get("trust_remote_code", False))
    if path:
        model = load_model(path, dtype, trust)
    elif model_cfg.get("kind") == "toy":
        torch.manual_seed(seed)
        from transformers import AutoModelForCausalLM as _Auto

        model = _Auto.from_config(toy_config(model_cfg.get("arch", "gpt2"), spec, tokenizer, max_length))
        model.to(dtype)
    else:
        raise ValueError(f"model.{role}.path is required for model.kind={model_cfg.get('kind')!r}")
    # The KV cache only slows training forwards; generation turns it back on explicitly.
    model.config.use_cache = False
    return model


def check_vocab(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Teacher/student must share the tokenizer; the teacher may have extra (padded) rows, never fewer.

    The loss drops a teacher's extra columns (distill.losses.align_vocab); a student wider than its
    teacher would leave student tokens without a target, and a tokenizer larger than either model
    would index past the embeddings.
    """
    v_s = student.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_t < v_s:
        raise ValueError(
            f"teacher vocab ({v_t}) is smaller than student vocab ({v_s}): the pair must share a tokenizer, "
            "and only the teacher may carry extra padded rows"
        )
    if len(tokenizer) > v_s:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the student's vocab is {v_s}")
    if v_t > v_s:
        log.info("teacher vocab %d > student vocab %d: extra teacher columns are dropped in the loss", v_t, v_s)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
