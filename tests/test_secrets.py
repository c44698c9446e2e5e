"""distill/secrets.py: what counts as a secret, and redaction."""

from omegaconf import OmegaConf

from distill.secrets import is_secret_key, is_secret_value, redact, secret_keys


def test_redact_drops_secrets_recursively():
    data = {"logger": {"api_key": "x", "project": "p"}, "model": {"hub_token": "t", "path": "gpt2"},
            "list": [{"password": 1, "ok": 2}]}
    assert redact(data) == {"logger": {"project": "p"}, "model": {"path": "gpt2"}, "list": [{"ok": 2}]}


def test_secret_keys_are_told_from_token_counts_and_tokenizers():
    secrets = ["hf_token", "logger.api_key", "+logger.api_key", "apiKey", "model.hub_token", "db_password",
               "aws_secret_access_key", "secret_key", "access_token", "WANDB_API_KEY", "client_secret"]
    fine = ["max_new_tokens", "model.tokenizer", "data.tokenizer_vocab_size", "pad_token", "eos_token",
            "train/tokens", "key", "teacher_cache_topk", "tokens_per_s", "monkey"]
    assert [k for k in secrets if not is_secret_key(k)] == []
    assert [k for k in fine if is_secret_key(k)] == []
    assert is_secret_value("hf_" + "a1B2" * 9) and not is_secret_value("hf_short")


def test_redact_keeps_the_configs_own_token_keys(smoke_cfg):
    data = OmegaConf.to_container(smoke_cfg(), resolve=True)
    assert redact(data) == data  # max_new_tokens, tokenizer, tokenizer_vocab_size all stay
    assert secret_keys(data) == []
    data["model"]["hub_token"] = "x"
    data["data"]["note"] = "hf_" + "Z" * 34
    assert sorted(secret_keys(data)) == ["data.note", "model.hub_token"]
    assert "hub_token" not in redact(data)["model"] and "note" not in redact(data)["data"]
