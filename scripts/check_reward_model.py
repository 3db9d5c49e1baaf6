"""Checks that transformers loads reward model folders written by `aligner rm` as
XxxForSequenceClassification, with every weight and no new one, and that they score the same
token ids as `aligner rm-score` does (float32 on the CPU, max difference below 1e-4).

    python3 scripts/check_reward_model.py [BUILD_DIR] [RM_DIR ...]

BUILD_DIR (default build-cuda) holds the aligner binary. Without RM_DIRs it first trains two small
reward models from examples/models/tiny-llama on the CPU, a few steps each: a pairwise one on
hh-rlhf and a nine-attribute regression one on NeMo's test-rm.jsonl. The ids scored are real texts
through the folder's own tokenizer, some ending with EOS (padding for these models, so the score is
read before it, by both) and padded in batches of four with pad_token_id.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = f"{ROOT}/examples/models/tiny-llama"
HH = f"{ROOT}/examples/data/hh-rlhf/harmless-test-600.jsonl"
TEST_RM = f"{ROOT}/examples/data/nemo-aligner/test-rm.jsonl"
BATCH = 4
TOLERANCE = 1e-4


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def train(aligner, work):
    """Two reward model folders trained by `aligner rm`."""
    train_file = f"{work}/hh-64.jsonl"
    with open(HH) as f, open(train_file, "w") as g:
        g.writelines(f.readlines()[:64])
    common = ["model.device=cpu", "trainer.max_steps=3", "optim.lr=1e-4", f"model.path={TINY}"]
    run([aligner, "rm", *common, f"data.train={train_file}", "data.skip_bad_lines=true", "data.max_length=128",
         "trainer.micro_batch_size=8", "trainer.global_batch_size=8", f"output_dir={work}/pairwise"])
    run([aligner, "rm", *common, "rm.type=regression", f"data.train={TEST_RM}", "data.max_length=256",
         "trainer.max_epochs=0", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
         f"output_dir={work}/regression"])
    return [f"{work}/pairwise/final", f"{work}/regression/final"]


def sequences(tok):
    """Token ids of real texts, of different lengths, half of them ending with EOS."""
    seqs = []
    with open(HH) as f:
        for i, line in enumerate(f.readlines()[:16]):
            ids = tok(json.loads(line)["chosen"], add_special_tokens=True)["input_ids"][: 40 + 11 * i]
            if i % 2 and tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
            seqs.append(ids)
    return seqs


def check(aligner, folder, work):
    cfg = AutoConfig.from_pretrained(folder)
    arch = cfg.architectures[0]
    assert arch.endswith("ForSequenceClassification"), f"{folder}: architectures {cfg.architectures}"
    model, info = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert type(model).__name__ == arch, f"{folder}: loaded as {type(model).__name__}, not {arch}"
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{folder}: {key} {info[key]}"
    assert cfg.pad_token_id is not None, f"{folder}: config.json has no pad_token_id"
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    seqs = sequences(tok)
    data = f"{work}/ids-{os.path.basename(os.path.dirname(folder))}.jsonl"
    with open(data, "w") as f:
        for ids in seqs:
            f.write(json.dumps({"input_ids": ids}) + "\n")
    out = run([aligner, "rm-score", "--model", folder, "--data", data, "--dtype", "float32", "--device", "cpu",
               "--batch-size", "3"])
    rows = [json.loads(line) for line in out.splitlines()]
    labels = [cfg.id2label[i] for i in range(cfg.num_labels)]
    ours = torch.tensor([[r["reward"]] if "reward" in r else [r["rewards"][n] for n in labels] for r in rows],
                        dtype=torch.float64)
    theirs = []
    with torch.no_grad():
        for start in range(0, len(seqs), BATCH):
            batch = seqs[start:start + BATCH]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [cfg.pad_token_id] * (width - len(s)) for s in batch])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
            theirs.append(model(input_ids=ids, attention_mask=mask).logits.double())
    theirs = torch.cat(theirs)
    diff = (ours - theirs).abs().max().item()
    ok = ours.shape == theirs.shape and diff < TOLERANCE
    print(f"{'ok  ' if ok else 'FAIL'} {folder}: {type(model).__name__}, {cfg.num_labels} label(s) {labels}, "
          f"{len(seqs)} sequences, max |aligner - transformers| = {diff:.2e}")
    return ok


def main():
    args = sys.argv[1:]
    build = args[0] if args else "build-cuda"
    aligner = os.path.abspath(f"{build}/aligner")
    with tempfile.TemporaryDirectory(prefix="check_rm_") as work:
        folders = args[1:] or train(aligner, work)
        results = [check(aligner, folder, work) for folder in folders]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
