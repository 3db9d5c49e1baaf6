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

It also writes tests/fixtures/tokenizers/variants/*.json: small tokenizer.json files cut down from
the real ones, rewired to use pipeline pieces the real files do not (the legacy Llama normalizer,
Metaspace that splits, more Split behaviours, added tokens with lstrip/rstrip/single_word), so that
those are checked against Hugging Face too. They come out the same on every run.
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
    ("variant-llama-legacy", "variants/llama-legacy.json"),
    ("variant-metaspace-split", "variants/metaspace-split.json"),
    ("variant-split-behaviours", "variants/split-behaviours.json"),
]
SENTENCEPIECE = [
    ("llama2-sp", "llama2/tokenizer.model"),
    ("mistral-v0.3-sp", "mistral-v0.3/tokenizer.model"),
]


def load_json(path):
    with open(os.path.join(FIXTURES, path), encoding="utf-8") as f:
        return json.load(f)


def shrink(tokenizer, keep_below):
    """Keeps ids below keep_below and every one-character token, and the merges among them.
    Ids are renumbered without gaps (added tokens and byte tokens sit below keep_below and keep
    theirs), so that a new added token's id is the same whichever way it is assigned."""
    model = tokenizer["model"]
    kept = sorted((i, t) for t, i in model["vocab"].items() if i < keep_below or len(t) == 1)
    vocab = {t: new_id for new_id, (_, t) in enumerate(kept)}
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append([a, b])
    model["vocab"] = vocab
    model["merges"] = merges
    return len(vocab)


def added(content, id, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False):
    return {"id": id, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": normalized, "special": special}


def write_variants():
    os.makedirs(os.path.join(FIXTURES, "variants"), exist_ok=True)

    # Llama 2 as transformers' legacy converter writes it: the normalizer adds the "▁"s.
    t = load_json("mistral-v0.3/tokenizer.json")
    next_id = shrink(t, 3000)
    t["added_tokens"] = t["added_tokens"][:5] + [
        added("<tool>", next_id, special=False, normalized=True, lstrip=True, rstrip=True)]
    t["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    t["pre_tokenizer"] = None
    variants = {"llama-legacy": t}

    t = load_json("mistral-v0.3/tokenizer.json")
    next_id = shrink(t, 3000)
    t["added_tokens"] = t["added_tokens"][:5] + [added("tok", next_id, special=False, single_word=True)]
    t["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                          "split": True}
    t["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    t["model"]["byte_fallback"] = False
    t["model"]["fuse_unk"] = False
    variants["metaspace-split"] = t

    t = load_json("llama3-style-bpe6k/tokenizer.json")
    next_id = shrink(t, 2000)
    t["added_tokens"].append(added("<|rs|>", next_id, lstrip=True, rstrip=True))
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "\n"}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Contiguous", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[,.;]"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[^\\s]+"}, "behavior": "Removed", "invert": True},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    t["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<|end_of_text|>", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|end_of_text|>": {"id": "<|end_of_text|>", "ids": [1], "tokens": ["<|end_of_text|>"]}}}]}
    variants["split-behaviours"] = t

    for name, t in variants.items():
        with open(os.path.join(FIXTURES, "variants", name + ".json"), "w", encoding="utf-8", newline="\n") as f:
            json.dump(t, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")


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
    write_variants()
    jobs = [(hf_records, name, path) for name, path in TOKENIZER_JSON]
    jobs += [(sp_records, name, path) for name, path in SENTENCEPIECE]

    lines = [json.dumps({"meta": versions()})]
    failed = []
    for make, name, path in jobs:
        try:
            records = list(make(name, path, texts))
        except Exception as e:  # keep the other tokenizers' fixtures; fail at the end
            print(f"FAILED {name} ({path}): {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        lines += [json.dumps(r) for r in records]  # ASCII: no raw U+2028 or U+0085 to split lines on
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
