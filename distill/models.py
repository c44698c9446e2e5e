"""Teacher/student pairs: tiny toy models built from sizes, or real ones from the Hugging Face hub.

Everything loads weights-only (safetensors, which `save_pretrained` writes by default), and
`trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from distill.chunked_losses import LogitTransform, head_logits
from distill.config import PRECISIONS, InputError

log = logging.getLogger(__name__)

_DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16)))


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
        try:
            model = load_model(path, dtype, trust)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            # A truncated/corrupt weights file, a dir without weights, a wrong architecture: the user's to fix.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"model.{role}.path={path}: cannot load this model ({type(exc).__name__}: {first}): "
                             "re-export or re-download it, or point at another model dir") from exc
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


def vocab_problem(v_student: int, v_teacher: int | None, n_tokenizer: int) -> str | None:
    """Why a pair's vocabularies cannot work together, or None. The teacher may have extra (padded) rows,
    never fewer: the loss drops a teacher's extra columns (distill.losses.align_vocab), a student wider than
    its teacher would leave student tokens without a target, and a tokenizer larger than the student would
    index past its embeddings."""
    if v_teacher is not None and v_teacher < v_student:
        return (f"teacher vocab ({v_teacher}) is smaller than student vocab ({v_student}): the pair must share a "
                "tokenizer, and only the teacher may carry extra padded rows")
    if n_tokenizer > v_student:
        return f"tokenizer has {n_tokenizer} tokens but the student's vocab is {v_student}: use the pair's own tokenizer"
    return None


def check_vocab(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Teacher/student must share the tokenizer; the teacher may have extra (padded) rows, never fewer.
    Shapes are read through ZeRO-3 partitioning (a sharded teacher)."""
    v_s = param_shape(student.get_output_embeddings().weight)[0]
    v_t = param_shape(teacher.get_output_embeddings().weight)[0]
    problem = vocab_problem(v_s, v_t, len(tokenizer))
    if problem:
        raise ValueError(problem)
    if v_t > v_s:
        log.info("teacher vocab %d > student vocab %d: extra teacher columns are dropped in the loss", v_t, v_s)


def check_vocab_configs(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, distill: bool) -> None:
    """`check_vocab` from the models' config.json files alone, before any weights are loaded.

    Toy models built from sizes take the tokenizer's vocabulary and cannot mismatch; a model loaded from a
    path reports its vocab_size in its config. Raises ValueError with the problem.
    """
    from transformers import AutoConfig

    def vocab(role: str) -> int | None:
        path = model_cfg[role].get("path")
        if not path:
            return len(tokenizer) if model_cfg.get("kind") == "toy" else None
        conf = AutoConfig.from_pretrained(str(path), trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
        size = getattr(conf, "vocab_size", None) or getattr(getattr(conf, "text_config", None), "vocab_size", None)
        return int(size) if size else None

    v_s = vocab("student")
    v_t = vocab("teacher") if distill else None
    if v_s is not None:
        problem = vocab_problem(v_s, v_t, len(tokenizer))
        if problem:
            raise ValueError(problem)


def count_params(model: torch.nn.Module) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def param_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO-3 has partitioned it (its local data is then empty)."""
    return getattr(param, "ds_shape", param.shape)


def gathered(params: list[torch.Tensor | None]):
    """Context in which ZeRO-3-partitioned `params` hold their full data on every rank (read-only; a no-op
    for ordinary parameters). Collective when it gathers: every rank must enter it."""
    params = [p for p in params if p is not None]
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# --------------------------------------------------------------------------------------------- output head
def logit_transform(config) -> LogitTransform:
    """The logit scaling / softcapping an architecture applies after its output head, read from its config.

    Cohere: ``logits * logit_scale``; Granite: ``logits / logits_scaling``; Gemma 2/3:
    ``cap * tanh(logits / cap)`` with ``cap = final_logit_softcapping``. `check_output_head` verifies the
    result against the model's own forward, so an architecture doing something else is caught, not guessed.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as the fused loss and the hidden-state cache see it: the head module (its
    weight and bias) and the transform applied to its output. `logits(hidden)` equals the model's logits."""

    module: torch.nn.Module
    transform: LogitTransform

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def loss_kwargs(self, role: str) -> dict[str, Any]:
        """`fused_distillation_loss` keyword arguments for `role` ("student" | "teacher"), weight excluded."""
        return {f"{role}_bias": self.bias, f"{role}_transform": self.transform}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits from final hidden states (gathers ZeRO-3-partitioned weights for the matmul)."""
        with gathered([self.weight, self.bias]):
            return head_logits(hidden, self.weight, self.bias, self.transform)


def output_head(model: PreTrainedModel) -> OutputHead:
    """`model`'s output head: its lm_head module and its architecture's logit transform."""
    module = model.get_output_embeddings()
    if module is None or not hasattr(module, "weight"):
        raise ValueError(f"{type(model).__name__} has no output head with a weight (get_output_embeddings())")
    return OutputHead(module, logit_transform(model.config))


def final_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 forward: Callable | None = None) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the final norm: what the output head reads) from one forward.

    `forward` is what to call (default `model`; pass the DeepSpeed engine that wraps it, so its hooks run).
    The base model's output is captured by a hook and the head computes the logits of one position only
    (`logits_to_keep=1`), so neither the full logits nor every layer's hidden states are kept.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    # The base model (GPT-2, Llama...) or its decoder (OPT's head calls model.decoder directly) returns them.
    bodies = {id(m): m for m in (model.base_model, model.get_decoder()) if m is not model}
    captured: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _a, out: captured.append(out[0])) for m in bodies.values()]
    try:
        if not handles:
            return (forward or model)(**kwargs, output_hidden_states=True).hidden_states[-1]
        out = (forward or model)(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not captured:  # an architecture that bypasses both: ask for the hidden states instead
        return (forward or model)(**kwargs, output_hidden_states=True).hidden_states[-1]
    del out
    return captured[-1]


@torch.no_grad()
def check_output_head(model: PreTrainedModel, head: OutputHead, role: str) -> None:
    """Raise ValueError unless `head.logits(final_hidden(...))` reproduces `model`'s own logits on a probe.

    Guards the fused loss and the hidden-state cache against an architecture whose head does something
    `logit_transform` does not model. Collective under ZeRO-3 (every rank must call it).
    """
    vocab = param_shape(head.weight)[0]
    device = next(model.parameters()).device
    ids = (torch.arange(8, device=device) * 7919 % vocab).view(1, -1)  # a few spread-out token ids
    want = model(input_ids=ids).logits.float()
    got = head.logits(final_hidden(model, ids)).float()
    tol = 1e-4 if head.weight.dtype == torch.float32 else 3e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item())):
        err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise ValueError(
            f"the {role}'s output head ({type(model).__name__}, transform {head.transform}) does not reproduce "
            f"its logits (max error {err:.3g}): this architecture post-processes its logits in a way "
            "distill.models.logit_transform does not know; use loss.impl=plain and loss.teacher_cache=logits or false"
        )
