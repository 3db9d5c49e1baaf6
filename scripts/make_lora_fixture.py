"""Makes the PEFT-written LoRA adapter that the CPU tests load: peft's own adapter folder for the
llama2 fixture model (rank 4 on every projection, B random so that it changes the output), and the
per-sequence log-probs that peft computes with it in float32 on the CPU.

Run on a machine with transformers and peft (the GPU machine), from the repo root:
    python3 scripts/make_lora_fixture.py
Writes tests/fixtures/lora/llama2-peft/ (adapter_config.json, adapter_model.safetensors) and
tests/fixtures/lora/llama2-peft.expected.json.
"""
import json
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BASE = "tests/fixtures/models/llama2"
OUT = "tests/fixtures/lora/llama2-peft"


def main():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, cfg).eval()
    shutil.rmtree(OUT, ignore_errors=True)
    model.save_pretrained(OUT, safe_serialization=True)
    for extra in os.listdir(OUT):  # peft writes a README too
        if extra not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(OUT, extra))
    seqs = json.load(open(os.path.join(BASE, "reference.json")))["sequences"]
    logprobs, base_logprobs = [], []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            for m, out in ((model, logprobs), (base, None)):
                if m is base:
                    with model.disable_adapter():
                        lp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
                    out = base_logprobs
                else:
                    lp = torch.log_softmax(m(input_ids=x).logits[0].float(), -1)
                out.append(float(lp[:-1].gather(1, x[0, 1:, None]).sum()) if len(ids) > 1 else 0.0)
    json.dump({"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
               "sequences": seqs, "logprob": logprobs, "base_logprob": base_logprobs},
              open(OUT + ".expected.json", "w"))
    print("wrote", OUT, "logprob", logprobs, "base", base_logprobs)


if __name__ == "__main__":
    main()
