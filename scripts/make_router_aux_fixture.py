"""The load-balancing loss that transformers adds to a Mixtral's training loss, on the mixtral
fixture model, for tests/test_families.cpp to compare aligner's with: its value and its gradient with
respect to each layer's router weight, for one sequence and for a right-padded batch with an
attention mask.

Run on a machine with transformers, from the repo root, after scripts/make_model_fixtures.py:
    python3 scripts/make_router_aux_fixture.py
Writes tests/fixtures/models/mixtral/router_aux.json and router_aux.safetensors.
"""
import json

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

DIR = "tests/fixtures/models/mixtral"


def main():
    model = AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32).eval()
    model.config.router_aux_loss_coef = 1.0
    seqs = json.load(open(f"{DIR}/reference.json"))["sequences"]
    routers = [(n, p) for n, p in model.named_parameters() if n.endswith("gate.weight") and "experts" not in n]
    cases, grads = [], {}
    batches = {"single": [seqs[3]], "padded": [seqs[2], seqs[3]]}
    for name, rows in batches.items():
        T = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        out.aux_loss.backward()
        cases.append({"name": name, "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                      "aux_loss": float(out.aux_loss)})
        for i, (n, p) in enumerate(routers):
            grads[f"{name}.layer{i}"] = p.grad.detach().clone().contiguous()
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "cases": cases},
              open(f"{DIR}/router_aux.json", "w"))
    save_file(grads, f"{DIR}/router_aux.safetensors")
    print("routers", [n for n, _ in routers], "aux", [c["aux_loss"] for c in cases])


if __name__ == "__main__":
    main()
