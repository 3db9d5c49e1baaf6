"""Writes examples/data/arithmetic/: synthetic additions with their answers, a task where online RL's
learning is visible (examples/demo_arithmetic.sh, tests/test_arithmetic.cpp).

    python3 scripts/make_arithmetic_data.py [--seed 13] [--out examples/data/arithmetic]

Each problem is a prompt "A+B=" whose answer is the sum, no spaces: "472+85=" -> "557". The same
prompt text is the SFT example's "input" and the RL line's "text", so with data.template=plain the
model sees the same tokens in SFT, in RL and at evaluation. Files:

  sft.jsonl       {"input": "472+85=", "output": "557"}   supervised fine-tuning
  rl.jsonl        {"text": "472+85=", "answer": "557"}    RL prompts (reward.rule=numeric)
  heldout.jsonl   as rl.jsonl                             held-out prompts, for validation

Operands have 2 or 3 digits (each drawn independently). Every number written (both operands and
the sum) is one whose digits are separate tokens for the demo model's tokenizer
(examples/models/tiny-llama/tokenizer.json, a 6k byte-level BPE): that BPE has merges for 30 pairs
of digits ("12", "47", "00", ...), so "47" would be one token while "46" is two, and the tiny model
then barely learns to add at all (0.5% held-out after the SFT that gives 70% on numbers of single
digit tokens). Numbers holding any of those pairs are skipped.

No problem (ordered pair A, B) is in two files. Deterministic: the same seed writes the same bytes.
Standard library only.
"""
import argparse
import json
import os
import random

HELDOUT, RL = 300, 1000  # the rest of the problems is the SFT split

TOKENIZER = "examples/models/tiny-llama/tokenizer.json"


def digit_merges(path):
    """The pairs of digits that the BPE merges into one token, e.g. {"12", "47", ...}."""
    with open(path) as f:
        model = json.load(f)["model"]
    pairs = set()
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if len(a) == 1 and len(b) == 1 and a.isdigit() and b.isdigit():
            pairs.add(a + b)
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--tokenizer", default=TOKENIZER)
    ap.add_argument("--out", default="examples/data/arithmetic")
    args = ap.parse_args()

    merges = digit_merges(args.tokenizer)

    def single_digit_tokens(n):
        s = str(n)
        return all(s[i:i + 2] not in merges for i in range(len(s) - 1))

    problems = [(a, b) for a in range(100, 1000) for b in range(1, 10)
                if all(map(single_digit_tokens, (a, b, a + b)))]
    random.Random(args.seed).shuffle(problems)
    splits = (("heldout", problems[:HELDOUT]), ("rl", problems[HELDOUT:HELDOUT + RL]),
              ("sft", problems[HELDOUT + RL:]))
    os.makedirs(args.out, exist_ok=True)
    for split, pairs in splits:
        path = os.path.join(args.out, f"{split}.jsonl")
        with open(path, "w", newline="\n") as f:
            for a, b in pairs:
                prompt, answer = f"{a}+{b}=", str(a + b)
                row = {"input": prompt, "output": answer} if split == "sft" else {"text": prompt, "answer": answer}
                f.write(json.dumps(row) + "\n")
        print(f"{path}: {len(pairs)} lines, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
