"""Worker for `test_objective.py::test_teacher_sharded_across_two_ranks` (run under torchrun, 2 processes).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train/sharded_teacher_worker.py \\
        TEACHER_DIR DATA_ROOT OUT_DIR

Each rank compares the teacher partitioned across the ranks by ZeRO-3 inference (the job's
`distill.teachers.source.build_teacher` with model.teacher.shard=true) with a full copy of the same teacher:
logits and final hidden states on its own batch, the hidden-state cache the two ranks build together (each its
share of the shards), and the fused loss with a ZeRO-3 student. Then both ranks run one whole cell with the sharded
teacher. Each rank writes what it saw to OUT_DIR/rank<r>.json; the test asserts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distill import models
from distill.data import encoding
from distill.data.encoding import response_mask
from distill.teachers import cache as tc
from distill.teachers.source import build_teacher
from distill.train import engine as eng
from distill.train.objective import fused_batch_loss
from distill.train.prepare import load_data_and_tokenizer
from distill.train.run import run_cell
from tests.conftest import compose


def main(teacher_dir: str, data_root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank, world = eng.setup_distributed(300)
    out = Path(out_dir)
    common = ["experiment=smoke", f"paths.data_dir={data_root}", f"model.teacher.path={teacher_dir}",
              "model.teacher.shard=true", "divergence=jsd", "tau=2", "eval.max_examples=2"]
    cfg = compose([*common, f"paths.root={out}/probe"])
    splits, tok = load_data_and_tokenizer(cfg)
    examples = encoding.encode_records(tok, splits.train[:16], cfg.data, encoding.TruncationStats())
    batch = encoding.collate_train(examples[rank * 4:(rank + 1) * 4], tok.pad_token_id)  # each rank its own rows
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    sharded, teacher_engine = build_teacher(cfg, tok, torch.float32, torch.device("cpu"))
    replica = models.load_model(teacher_dir, torch.float32).eval()
    report: dict = {
        "world": world,
        "partitioned": all(hasattr(p, "ds_id") for p in sharded.parameters()),
        "local_numel": sum(p.ds_tensor.numel() for p in sharded.parameters()),
        "full_numel": sum(p.numel() for p in replica.parameters()),
    }
    with torch.no_grad():
        a, b = sharded(**inputs).logits, replica(**inputs).logits
        report["logits_max_diff"] = (a - b).abs().max().item()
        report["logits_max_abs"] = b.abs().max().item()
        h_a, h_b = models.final_hidden(sharded, **inputs), models.final_hidden(replica, **inputs)
        report["hidden_max_diff"] = (h_a - h_b).abs().max().item()

    # The hidden-state cache, built by both ranks with the sharded teacher: which shards did this rank write?
    written: list[str] = []
    real_save = tc._save_atomic
    tc._save_atomic = lambda tensors, path, meta: written.append(path.name) or real_save(tensors, path, meta)
    cache = tc.TeacherCache.build_or_load(out / "cache", sharded, teacher_dir, examples, pad_id=tok.pad_token_id,
                                          batch_size=3, kind="hidden", device=torch.device("cpu"),
                                          dtype=torch.float32, progress=False)
    tc._save_atomic = real_save
    ids = list(range(rank * 4, (rank + 1) * 4))
    with torch.no_grad():
        mask = tc.response_positions(batch["labels"])
        report["cache_written"] = written
        report["cache_max_diff"] = (cache.batch_hidden(ids, batch["labels"])[mask] - h_b[mask]).abs().max().item()

    # The fused loss: ZeRO-3 student + sharded teacher (head gathered) vs ZeRO-0 student + the full copy.
    fused_cfg = compose([*common, "loss.impl=fused", "loss.chunk_size=5", f"paths.root={out}/probe"])
    num_tokens = float(response_mask(batch["labels"]).sum()) * world  # a stand-in global count
    losses = {}
    for stage, teacher in ((3, sharded), (0, replica)):
        torch.manual_seed(0)
        student = models.build_model(fused_cfg.model, "student", tok, torch.float32, 96, seed=0)
        engine = eng.initialize(student, {**fused_cfg.trainer, "zero_stage": stage}, world)
        steps = []
        for _ in range(2):
            loss, _ = fused_batch_loss(fused_cfg, engine, teacher, batch, num_tokens)
            engine.backward(loss * world)
            engine.step()
            steps.append(loss.item())
        losses[stage] = steps
    report["fused_losses"] = losses
    del teacher_engine, sharded

    # One whole cell with the sharded teacher, the fused loss at ZeRO-3 and the hidden-state cache.
    m = run_cell(compose([*common, "loss.impl=fused", "trainer.zero_stage=3", "trainer.micro_batch_size=4",
                                "loss.teacher_cache=auto", f"paths.root={out}/cell"]))
    report["cell_final_loss"] = m["train"]["final_loss"]
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
