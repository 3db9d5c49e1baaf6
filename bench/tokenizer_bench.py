#!/usr/bin/env python3
"""Times Hugging Face `tokenizers` (and `sentencepiece`) single-threaded on bench/data's text, to
compare with the C++ bench/tokenizer_bench.cpp on the same machine. Run from the repository root:

  python3 bench/tokenizer_bench.py                  # prints MB/s per tokenizer
  python3 bench/tokenizer_bench.py --make-data /work/shared/datasets   # (re)writes the text

Both benches encode every line with special tokens added (HF's default) and print the total token
count, which must agree between them.
"""
import argparse
import gzip
import json
import os
import sys
import time

# Before tokenizers is imported: its thread pool reads these once.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

FIXTURES = os.path.join("tests", "fixtures", "tokenizers")
DATA = os.path.join("bench", "data", "tokenizer_bench.jsonl")
TOKENIZERS = ["gpt2/tokenizer.json", "mistral-v0.3/tokenizer.json", "llama3-style-bpe6k/tokenizer.json",
              "llama2/tokenizer.model"]
MAX_BYTES = 2_000_000


def make_data(datasets):
    """All of code_alpaca_2k, then hh-rlhf 'chosen' conversations up to MAX_BYTES of text."""
    texts = []
    with open(os.path.join(datasets, "code-alpaca", "code_alpaca_2k.json"), encoding="utf-8") as f:
        for e in json.load(f):
            texts.append("\n".join(x for x in (e["instruction"], e["input"], e["output"]) if x))
    size = sum(len(t.encode()) for t in texts)
    with gzip.open(os.path.join(datasets, "hh-rlhf-harmless", "test.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["chosen"]
            if size + len(text.encode()) > MAX_BYTES:
                break
            texts.append(text)
            size += len(text.encode())
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    with open(DATA, "w", encoding="utf-8", newline="\n") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    print(f"wrote {DATA}: {len(texts)} lines, {size / 1e6:.2f} MB of text")


def load_texts():
    with open(DATA, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def timed(encode, texts, repeat):
    """Seconds of the first pass and of the best of `repeat` passes, and the token count."""
    times, tokens = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = encode(texts)
        times.append(time.perf_counter() - start)
    return times[0], min(times), tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-data", metavar="DATASETS", help="write bench/data from this datasets folder")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.make_data:
        make_data(args.make_data)
        return

    texts = load_texts()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"text: {DATA}, {len(texts)} lines, {mb:.2f} MB; one thread")
    for path in TOKENIZERS:
        full = os.path.join(FIXTURES, path)
        if path.endswith(".model"):
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=full)
            bos = sp.bos_id()
            runs = {"loop": lambda ts: sum(len([bos] + sp.encode(t)) for t in ts)}
        else:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(full)
            runs = {
                "loop": lambda ts: sum(len(tok.encode(t).ids) for t in ts),
                "batch": lambda ts: sum(len(e.ids) for e in tok.encode_batch(ts)),
            }
        for mode, encode in runs.items():
            try:
                first, best, tokens = timed(encode, texts, args.repeat)
            except Exception as e:  # report and go on with the other tokenizers
                print(f"hf   {path:36s} {mode:5s} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            print(f"hf   {path:36s} {mode:5s} {mb / best:8.2f} MB/s  (first pass {mb / first:6.2f} MB/s, "
                  f"{tokens} tokens)")


if __name__ == "__main__":
    main()
