"""distill/cell/fingerprints.py: content fingerprints of a cell's input files, memoised by stat, in the identity."""

from __future__ import annotations

import json
import os
import time

import pytest

from distill.cell import fingerprints as inputs
from distill.cell.hashing import CACHE_FILE, DigestCache
from distill.cell import identity as runs
from distill.options import InputError
from tests.conftest import compose


def _jsonl(path, n=3):
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return path


def _cfg(tmp_path, train):
    return compose(["data=dolly", "data.kind=jsonl", f"data.train_file={train}", "data.valid_size=1",
                    "data.test_size=1", f"paths.root={tmp_path}"])


def test_fingerprints_record_and_follow_content(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl")
    cfg = _cfg(tmp_path, train)
    fp = inputs.fingerprints(cfg)
    rec = fp["data.train_file"]
    assert rec["path"] == str(train) and rec["size"] == train.stat().st_size and len(rec["sha256"]) == 64
    assert set(fp) == {"data.train_file"}  # toy pair: no model files, the tokenizer comes with the data
    sig = runs.signature(cfg, inputs=fp)
    assert runs.signature(cfg, inputs=inputs.fingerprints(cfg)) == sig  # stable

    # Edit the file and put its mtime back: size equal, mtime equal, content not.
    st = train.stat()
    train.write_text(train.read_text().replace("a1", "b1"))
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert train.stat().st_size == st.st_size and train.stat().st_mtime_ns == st.st_mtime_ns
    fp2 = inputs.fingerprints(cfg)
    assert fp2["data.train_file"]["sha256"] != rec["sha256"]
    assert runs.signature(cfg, inputs=fp2) != sig
    assert inputs.changes(fp, fp2) == [
        f"data.train_file: sha256 {rec['sha256'][:12]} ({rec['size']} bytes, modified {rec['mtime']}) -> "
        f"sha256 {fp2['data.train_file']['sha256'][:12]} ({rec['size']} bytes, modified {rec['mtime']})"]


def test_digests_are_cached_by_stat(tmp_path, monkeypatch):
    train = _jsonl(tmp_path / "train.jsonl")
    cfg = _cfg(tmp_path, train)
    inputs.fingerprints(cfg)
    assert (tmp_path / "cache" / CACHE_FILE).exists()
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(str(p)) or real_open(p, *a, **k))
    inputs.fingerprints(cfg)
    assert str(train) not in reads  # unchanged file: not read again


def test_a_model_dir_is_fingerprinted_file_by_file(tmp_path):
    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / ".cache").mkdir()
    (model / ".cache" / "junk").write_text("ignored")
    cache = DigestCache(None)
    fp = inputs.fingerprint_path(model, cache)
    assert fp["files"] == 2 and fp["size"] == 66
    time.sleep(0.01)
    (model / "model.safetensors").write_bytes(b"\1" * 64)  # retrained into the same dir
    assert inputs.fingerprint_path(model, cache)["sha256"] != fp["sha256"]


def test_a_missing_input_is_one_line(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match=r"^data.train_file=.*nope.jsonl: no such file or directory: point it at an existing path$"):
        inputs.fingerprints(cfg)


def test_teacher_counts_only_when_distilling(tmp_path):
    t = tmp_path / "t"
    t.mkdir()
    (t / "config.json").write_text("{}")
    assert "model.teacher" in inputs.input_refs(compose([f"model.teacher.path={t}"]))
    assert "model.teacher" not in inputs.input_refs(compose([f"model.teacher.path={t}", "loss.kd_ratio=0"]))
