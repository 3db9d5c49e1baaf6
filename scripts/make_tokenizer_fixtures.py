#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizers/expected.jsonl: the ids and decoded text that Hugging Face
`tokenizers` and `sentencepiece` give for every line of tests/fixtures/tokenizers/corpus.jsonl.

Run from the repository root: python3 scripts/make_tokenizer_fixtures.py
The C++ tests (tests/test_tokenizer.cpp) compare the project's tokenizers against this file.

Each output line is one JSON object:
  {"meta": {...}}                                   first line: library versions
  {"tokenizer": NAME, "file": PATH, "kind": KIND, "vocab_size": N}   once per tokenizer
  {"tokenizer": NAME, "line": I, "ids": [...], "ids_no_special": [...],
   "decoded": "...", "decoded_skip_special": "..."}  once per tokenizer and corpus line
PATH is relative to tests/fixtures/tokenizers. KIND is "tokenizer.json" or "sentencepiece".
"ids" is encode(text) with special tokens added (HF's default; for SentencePiece BOS first, as
Llama's tokenizer adds it), "decoded" is decode(ids) keeping special tokens.
"""
import json
import os
import sys

FIXTURES = os.path.join("tests", "fixtures", "tokenizers")
CORPUS = os.path.join(FIXTURES, "corpus.jsonl")
OUTPUT = os.path.join(FIXTURES, "expected.jsonl")

TOKENIZER_JSON = [
    ("gpt2", "gpt2/tokenizer.json"),
    ("mistral-v0.3", "mistral-v0.3/tokenizer.json"),
    ("llama3-style-bpe6k", "llama3-style-bpe6k/tokenizer.json"),
]
SENTENCEPIECE = [
    ("llama2-sp", "llama2/tokenizer.model"),
    ("mistral-v0.3-sp", "mistral-v0.3/tokenizer.model"),
]


def read_corpus():
    texts = []
    with open(CORPUS, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("text"), str):
                sys.exit(f"{CORPUS}:{number}: no string field 'text'")
            texts.append(record["text"])
    return texts


def hf_records(name, path, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(FIXTURES, path))
    yield {"tokenizer": name, "file": path, "kind": "tokenizer.json",
           "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    for i, text in enumerate(texts):
        ids = tok.encode(text).ids
        yield {
            "tokenizer": name,
            "line": i,
            "ids": ids,
            "ids_no_special": tok.encode(text, add_special_tokens=False).ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        }


def sp_records(name, path, texts):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(FIXTURES, path))
    yield {"tokenizer": name, "file": path, "kind": "sentencepiece",
           "vocab_size": sp.get_piece_size()}
    for i, text in enumerate(texts):
        plain = sp.encode(text)
        ids = [sp.bos_id()] + plain
        # SentencePiece decodes control pieces (BOS, EOS) to nothing, so both decodes agree.
        decoded = sp.decode(ids)
        yield {
            "tokenizer": name,
            "line": i,
            "ids": ids,
            "ids_no_special": plain,
            "decoded": decoded,
            "decoded_skip_special": decoded,
        }


def versions():
    meta = {"python": sys.version.split()[0]}
    for module in ("tokenizers", "sentencepiece"):
        try:
            meta[module] = __import__(module).__version__
        except Exception as e:  # recorded, not fatal: the run below reports what failed
            meta[module] = f"unavailable: {e}"
    return meta


def main():
    if not os.path.isfile(CORPUS):
        sys.exit(f"{CORPUS} not found: run from the repository root")
    texts = read_corpus()
    jobs = [(hf_records, name, path) for name, path in TOKENIZER_JSON]
    jobs += [(sp_records, name, path) for name, path in SENTENCEPIECE]

    lines = [json.dumps({"meta": versions()}, ensure_ascii=False)]
    failed = []
    for make, name, path in jobs:
        try:
            records = list(make(name, path, texts))
        except Exception as e:  # keep the other tokenizers' fixtures; fail at the end
            print(f"FAILED {name} ({path}): {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        lines += [json.dumps(r, ensure_ascii=False) for r in records]
        tokens = sum(len(r["ids"]) for r in records[1:])
        print(f"{name:20s} {path:36s} vocab {records[0]['vocab_size']:6d}  "
              f"{len(records) - 1} lines  {tokens} tokens")

    with open(OUTPUT, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    size = os.path.getsize(OUTPUT)
    print(f"wrote {OUTPUT}: {len(lines)} records, {size / 1024:.1f} KiB, {len(texts)} corpus lines")
    if size > 1 << 20:
        print("warning: fixture is over 1 MiB", file=sys.stderr)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
