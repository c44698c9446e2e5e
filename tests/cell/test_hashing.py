"""distill/cell/hashing.py: one recipe for file digests (memoised) and keys, shared by the identity and the caches."""

from __future__ import annotations

import hashlib

import torch

from distill.cell.fingerprints import fingerprint_path
from distill.cell.hashing import DigestCache, files_digest, short_hash, token_digest
from distill.teachers.cache import examples_fingerprint, teacher_fingerprint


def test_short_hash_is_the_signatures_sha1_prefix():
    assert short_hash("abc", 8) == hashlib.sha1(b"abc").hexdigest()[:8]


def test_token_digest_equals_hashing_the_int64_tensors():
    """The teacher cache's key of its examples: the same bytes as int64 tensors, so finished caches stay found."""
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [7], "labels": [7]}]
    h = hashlib.sha1()
    for ex in examples:
        h.update(torch.tensor(ex["input_ids"], dtype=torch.int64).numpy().tobytes())
        h.update(torch.tensor(ex["labels"], dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    assert examples_fingerprint(examples) == token_digest((e["input_ids"], e["labels"]) for e in examples) == h.hexdigest()


def test_the_teacher_is_read_once_for_the_inputs_fingerprint_and_the_cache_key(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "model.safetensors").write_bytes(b"\1" * 4096)
    (teacher / "tokenizer.json").write_text("{}")   # not a weight file: not in the teacher's fingerprint
    cache_dir = tmp_path / "cache"
    digests = DigestCache(cache_dir)
    fingerprint_path(teacher, digests)
    digests.save()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(str(p)) or real_open(p, *a, **k))
    fp = teacher_fingerprint(teacher, cache_dir)
    assert not [r for r in reads if r.startswith(str(teacher))]   # digests memoised by the inputs' fingerprint
    files = [teacher / "config.json", teacher / "model.safetensors"]
    assert fp == files_digest(files, teacher, DigestCache(None))
    (teacher / "model.safetensors").write_bytes(b"\2" * 4096)     # retrained into the same dir
    assert teacher_fingerprint(teacher, cache_dir) != fp
