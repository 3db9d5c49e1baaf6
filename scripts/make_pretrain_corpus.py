"""Writes the plain-text corpus the demo model is pretrained on: every real text in ../shared
(hh-rlhf conversations, NeMo-Aligner's chat samples, code-alpaca), one {"text": ...} per line.

    python3 scripts/make_pretrain_corpus.py ../shared OUT.jsonl [VALIDATION.jsonl]

Deterministic: the same files give the same corpus. Every 50th document goes to validation.
"""
import gzip
import json
import sys


def documents(shared):
    with gzip.open(f"{shared}/datasets/hh-rlhf-harmless/test.jsonl.gz", "rt") as f:
        for line in f:
            rec = json.loads(line)
            yield rec["chosen"].strip()
    for name in ["sft_512_sample_llama3_format.jsonl", "sft_512_sample_extra_id_format.jsonl"]:
        with open(f"{shared}/datasets/nemo-aligner-tests/{name}") as f:
            for line in f:
                rec = json.loads(line)
                turns = [f"{t['from']}: {t['value'].strip()}" for t in rec["conversations"]]
                yield "\n\n".join(turns)
    with open(f"{shared}/datasets/code-alpaca/code_alpaca_2k.json") as f:
        for rec in json.load(f):
            parts = [rec["instruction"], rec.get("input", ""), rec["output"]]
            yield "\n\n".join(p.strip() for p in parts if p.strip())


def main():
    shared, out = sys.argv[1], sys.argv[2]
    val = sys.argv[3] if len(sys.argv) > 3 else None
    n = chars = 0
    with open(out, "w") as f, open(val or "/dev/null", "w") as g:
        for i, doc in enumerate(documents(shared)):
            if not doc:
                continue
            (g if val and i % 50 == 0 else f).write(json.dumps({"text": doc}) + "\n")
            n += 1
            chars += len(doc)
    print(f"{n} documents, {chars / 1e6:.1f} M characters")


if __name__ == "__main__":
    main()
