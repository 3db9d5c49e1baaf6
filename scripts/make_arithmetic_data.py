"""Writes examples/data/arithmetic/: synthetic additions with their answers, for a task where online
RL's learning is visible (examples/demo_arithmetic.sh, tests/test_arithmetic.cpp).

    python3 scripts/make_arithmetic_data.py [--seed 13] [--out examples/data/arithmetic]

Every problem is a prompt "A+B=" with its sum as the answer, no spaces: "47+385=" -> "432". The
same prompt text is the SFT example's "input" and the RL line's "text", so with data.template=plain
the model sees the same tokens in SFT, in RL and at evaluation. Files:

  sft.jsonl       {"input": "47+385=", "output": "432"}   supervised fine-tuning
  rl.jsonl        {"text": "47+385=", "answer": "432"}    RL prompts (reward.rule=numeric)
  heldout.jsonl   {"text": "...", "answer": "..."}        held-out prompts, as rl.jsonl
  easy-sft.jsonl, easy-rl.jsonl, easy-heldout.jsonl       the same for one-digit operands (the test)

No problem (ordered pair A, B) appears in two splits. Deterministic: the same seed writes the same
bytes. Standard library only.
"""
import argparse
import json
import os
import random

# Operand digits of the main set: each operand has 1 to 3 digits, the digit counts drawn
# independently, so that most sums carry and some do not: SFT on the tiny demo model gets part of
# the held-out problems right, leaving room for RL.
SIZES = {"sft": 4000, "rl": 1500, "heldout": 200}
# The easy set (one-digit operands: only 100 problems exist) for the test's quick run.
EASY_SIZES = {"sft": 50, "rl": 30, "heldout": 20}


def operand(rng, max_digits):
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10 ** digits - 1)


def draw(rng, count, seen, make):
    out = []
    while len(out) < count:
        pair = make()
        if pair in seen:
            continue
        seen.add(pair)
        out.append(pair)
    return out


def write(path, pairs, kind):
    with open(path, "w", newline="\n") as f:
        for a, b in pairs:
            prompt = f"{a}+{b}="
            row = {"input": prompt, "output": str(a + b)} if kind == "sft" else {"text": prompt, "answer": str(a + b)}
            f.write(json.dumps(row) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--max-digits", type=int, default=3)
    ap.add_argument("--out", default="examples/data/arithmetic")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    rng = random.Random(args.seed)
    seen = set()
    # Held-out first, so that its problems are drawn from the whole distribution.
    for split in ("heldout", "rl", "sft"):
        pairs = draw(rng, SIZES[split], seen,
                     lambda: (operand(rng, args.max_digits), operand(rng, args.max_digits)))
        write(os.path.join(args.out, f"{split}.jsonl"), pairs, "sft" if split == "sft" else "rl")

    easy = [(a, b) for a in range(10) for b in range(10)]
    random.Random(args.seed + 1).shuffle(easy)
    start = 0
    for split in ("heldout", "rl", "sft"):
        n = EASY_SIZES[split]
        write(os.path.join(args.out, f"easy-{split}.jsonl"), easy[start:start + n], "sft" if split == "sft" else "rl")
        start += n

    for name in sorted(os.listdir(args.out)):
        if name.endswith(".jsonl"):
            path = os.path.join(args.out, name)
            print(f"{path}: {sum(1 for _ in open(path))} lines, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
