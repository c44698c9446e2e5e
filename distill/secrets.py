"""What counts as a secret in a config or on a command line, and redaction: a token never reaches a file.

Configs are written to disk (config.yaml, Hydra's multirun.yaml) and to W&B; a secret must stay in the
environment. Keys are judged on their last dotted part, word by word, so that `hf_token`, `logger.api_key`,
`apiKey` or `db_password` are secrets while `max_new_tokens`, `tokenizer` or `pad_token` are not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

_SECRET_WORDS = {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials", "apikey"}
_SECRET_KEY_PREFIXES = {"api", "access", "secret", "private", "auth", "signing"}
_SPECIAL_TOKENS = {f"{w}_token" for w in ("pad", "eos", "bos", "unk", "sep", "cls", "mask")}
# Values that are secrets whatever their key is called (Hugging Face user access tokens).
_SECRET_VALUE = re.compile(r"^hf_[A-Za-z0-9]{30,}$")


def is_secret_key(key: str) -> bool:
    """Does a config key (`hf_token`, `logger.api_key`, `+model.hub_token`) name a secret?"""
    name = str(key).lstrip("+~").rsplit(".", 1)[-1]
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()  # apiKey -> api_key
    if name in _SPECIAL_TOKENS:
        return False
    words = [w for w in re.split(r"[_\-]", name) if w]
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or (len(words) > 1 and words[-1] == "key" and words[-2] in _SECRET_KEY_PREFIXES)


def is_secret_value(value: Any) -> bool:
    """A value that is a secret whatever its key (a Hugging Face access token)."""
    return isinstance(value, str) and bool(_SECRET_VALUE.match(value.strip()))


def secret_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys in `data` that name a secret and hold a value, or hold a secret-looking value."""
    out: list[str] = []
    if isinstance(data, Mapping):
        for k, v in data.items():
            key = f"{prefix}{k}"
            # An env interpolation (`${oc.env:HF_TOKEN}`) keeps the secret in the environment: fine.
            from_env = isinstance(v, str) and v.strip().startswith("${oc.env:")
            if is_secret_key(str(k)) and v not in (None, "", {}, []) and not from_env:
                out.append(key)
            else:
                out += secret_keys(v, f"{key}.")
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            out += secret_keys(v, f"{prefix}{i}.")
    elif is_secret_value(data):
        out.append(prefix.rstrip("."))
    return out


def redact(data: Any) -> Any:
    """Drop every mapping key that names a secret and every secret-looking value, recursively.

    Configs are logged to files and W&B; a token that slipped into a config must never follow.
    """
    if isinstance(data, Mapping):
        return {k: redact(v) for k, v in data.items() if not is_secret_key(str(k)) and not is_secret_value(v)}
    if isinstance(data, (list, tuple)):
        return [redact(v) for v in data if not is_secret_value(v)]
    return data


def secret_overrides(argv: list[str]) -> list[str]:
    """The command-line overrides (`key=value`, `+key=value`) whose key, value or any of whose sweep choices
    (`key=a,b`) looks like a secret."""
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        if value.strip().startswith("${oc.env:"):
            continue  # the secret stays in the environment; only its name is on the command line
        if is_secret_key(key.lstrip("+~")) or any(is_secret_value(v) for v in [value, *re.split(r"[,()\[\]]", value)]):
            out.append(key)
    return out


def secret_env_values(environ: Mapping[str, str]) -> list[str]:
    """The values of the environment variables whose names name a secret (HF_TOKEN, WANDB_API_KEY, ...)."""
    return [v for k, v in environ.items() if is_secret_key(k) and len(v) >= 8]


def redact_env(data: Any, secrets: Sequence[str]) -> Any:
    """`redact`, and every string holding one of `secrets` (a value read from the environment, say through
    `${oc.env:HF_TOKEN}` or an interpolation of it) dropped too: values from the environment are judged by
    their variable's name, as keys are."""
    if isinstance(data, Mapping):
        return {k: redact_env(v, secrets) for k, v in redact(data).items()
                if not (isinstance(v, str) and any(s in v for s in secrets))}
    if isinstance(data, (list, tuple)):
        return [redact_env(v, secrets) for v in redact(data) if not (isinstance(v, str) and any(s in v for s in secrets))]
    return data


def redacted_config(cfg: Any) -> dict:
    """The resolved config as it may be written (config.yaml, W&B): no secret key, value or environment secret."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return redact_env(data, secret_env_values(os.environ))
