"""Writes examples/data/arithmetic/: synthetic additions with their answers, a task where online RL's
learning is visible (examples/demo_arithmetic.sh, tests/test_arithmetic.cpp).

    python3 scripts/make_arithmetic_data.py [--seed 13] [--out examples/data/arithmetic]

Each problem is a prompt "A+B=" whose answer is the sum, no spaces: "669+7=" -> "676", A of three
digits, B of one (1-9). The same prompt text is the SFT example's "input" and the RL line's
"text", so with data.template=plain the model sees the same tokens in SFT, in RL and at
evaluation. Files:

  heldout.jsonl   {"text": "765+2=", "answer": "767"}    300 held-out prompts, for validation
  rl.jsonl        as heldout.jsonl                       1000 RL prompts (reward.rule=numeric)
  sft.jsonl       {"input": "669+7=", "output": "676"}   the other 1342, supervised fine-tuning

Every number written (both operands and the sum) has its digits as separate tokens of the demo
model's tokenizer (examples/models/tiny-llama/tokenizer.json, a 6k byte-level BPE). That BPE merges
30 pairs of digits ("12", "47", "00", ...), so "47" is one token while "46" is two, and the 4.4M
model then barely learns to add: on three-digit plus two-digit problems, 1000 SFT steps gave 0.5%
held-out with all numbers and 71% with only numbers of single-digit tokens. Numbers holding any of
those pairs are left out. A of three digits and B of one, always in that order: a mixed order or
more digits took the tiny model 500-800 SFT steps to start adding at all, which leaves no CPU time
for RL in a demo; this set goes from 20% to 42% between SFT steps 150 and 200.

All such problems are enumerated, shuffled with the seed and split, so none is in two files, and
the same seed writes the same bytes. Standard library only.
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
