#!/usr/bin/env python3
"""Writes the fuzzers' seed inputs into fuzz/corpus/<target>/, derived from tests/fixtures and
examples/. The fixtures themselves are too large to seed from (a tokenizer.json of megabytes, a
safetensors file of hundreds of kilobytes): libFuzzer would cut them to -max_len and mutate noise.
Each seed here is a small file of the same structure. Run from anywhere; rewrites the corpus."""
import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
FIXTURES = ROOT / "tests" / "fixtures"


def target(name):
    folder = CORPUS / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def safetensors(path, tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] laid out in order."""
    header, offset, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def safetensors_seeds():
    out = target("safetensors")
    f32 = lambda n: struct.pack(f"<{n}f", *[i * 0.5 for i in range(n)])
    safetensors(out / "f32.safetensors",
                [("model.embed_tokens.weight", "F32", [2, 3], f32(6)), ("lm_head.weight", "F32", [3], f32(3))],
                {"format": "pt"})
    safetensors(out / "dtypes.safetensors",
                [("empty", "F32", [0, 4], b""), ("scalar", "BF16", [], b"\x80\x3f"), ("ids", "I64", [2], struct.pack("<2q", 1, -1)),
                 ("half", "F16", [1, 1], b"\x00\x3c"), ("flags", "BOOL", [3], b"\x01\x00\x01"), ("bytes", "U8", [2], b"\x07\xff"),
                 ("i8", "I8", [1], b"\x80"), ("i16", "I16", [1], b"\x01\x80"), ("i32", "I32", [1], b"\x01\x00\x00\x80"),
                 ("f64", "F64", [1], struct.pack("<d", 2.5))])
    # The real checkpoint's names and dtypes, with every tensor shrunk to two elements.
    raw = (FIXTURES / "models" / "llama2" / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        size = {"F32": 4, "BF16": 2, "F16": 2}[entry["dtype"]]
        tensors.append((name, entry["dtype"], [2], bytes(range(2 * size))))
    safetensors(out / "llama2-shrunk.safetensors", tensors[:6], header.get("__metadata__"))


def shrink_tokenizer(source, keep, words=0):
    """The tokenizer.json with the vocabulary's first `keep` ids, its byte-fallback pieces, `words`
    more pieces, the added tokens the file needs and the merges among what is left, renumbered."""
    j = json.loads(source.read_text())
    model = j["model"]
    post = j.get("post_processor") or {}
    processors = [post] + post.get("processors", [])
    special = {name for p in processors for name in (p.get("special_tokens") or {})}
    added_text = {a["content"] for a in j["added_tokens"]}
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    kept = [t for t in tokens if model["vocab"][t] < keep or (t.startswith("<0x") and len(t) == 6)]
    kept += [t for t in tokens if model["vocab"][t] >= keep and t not in added_text and not t.startswith("<0x")][:words]
    kept.sort(key=model["vocab"].get)
    vocab = {t: i for i, t in enumerate(kept)}
    added = []
    for a in j["added_tokens"]:
        if a["id"] < keep or a["content"] in special or len(added) < 4:
            vocab.setdefault(a["content"], len(vocab))
            added.append(dict(a, id=vocab[a["content"]]))
    for p in processors:
        for name, entry in (p.get("special_tokens") or {}).items():
            entry["ids"] = [vocab.get(name, 0)]
    merges = []
    for m in model["merges"]:
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        if left in vocab and right in vocab and left + right in vocab:
            merges.append(m)
    model["vocab"], model["merges"] = vocab, merges[:150]
    j["added_tokens"] = added
    return json.dumps(j, ensure_ascii=False, separators=(",", ":"))


def tokenizer_json_seeds():
    out = target("tokenizer_json")
    tok = FIXTURES / "tokenizers"
    # Byte-level vocabularies start with their 256 byte symbols.
    for name, source, keep, words in [("byte_level", tok / "gpt2" / "tokenizer.json", 320, 0),
                                      ("llama3_split", tok / "llama3-style-bpe6k" / "tokenizer.json", 320, 0),
                                      ("metaspace_byte_fallback", tok / "mistral-v0.3" / "tokenizer.json", 3, 200),
                                      ("llama_legacy", tok / "variants" / "llama-legacy.json", 3, 200),
                                      ("metaspace_split", tok / "variants" / "metaspace-split.json", 3, 200),
                                      ("split_behaviours", tok / "variants" / "split-behaviours.json", 320, 0)]:
        (out / f"{name}.json").write_text(shrink_tokenizer(source, keep, words), encoding="utf-8")


def protobuf_fields(data):
    """(field number, the field's bytes, its value) for each field: a varint's number, a
    length-delimited field's payload."""
    pos = 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            c = data[pos]
            pos += 1
            value |= (c & 0x7F) << shift
            shift += 7
            if c < 0x80:
                return value

    while pos < len(data):
        start = pos
        key = varint()
        wire, value = key & 7, None
        if wire == 0:
            value = varint()
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n = varint()
            value = data[pos:pos + n]
            pos += n
        elif wire == 5:
            pos += 4
        yield key >> 3, data[start:pos], value


def piece_type(payload):
    for number, _, value in protobuf_fields(payload):
        if number == 3:
            return value
    return 1


def varint(value):
    out = b""
    while value >= 0x80:
        out += bytes([value & 0x7F | 0x80])
        value >>= 7
    return out + bytes([value])


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def trainer_spec(payload):
    """TrainerSpec without all but four of its user_defined_symbols (Mistral lists 768)."""
    fields = list(protobuf_fields(payload))
    symbols = [raw for number, raw, _ in fields if number == 30][:4]
    return b"".join(raw for number, raw, _ in fields if number != 30) + b"".join(symbols)


def sentencepiece_seeds():
    out = target("sentencepiece")
    for name, source in [("llama2", FIXTURES / "tokenizers" / "llama2" / "tokenizer.model"),
                         ("mistral", FIXTURES / "tokenizers" / "mistral-v0.3" / "tokenizer.model")]:
        fields = list(protobuf_fields(source.read_bytes()))
        pieces = [(raw, piece_type(value)) for number, raw, value in fields if number == 1]
        # The control pieces that bos/eos/unk ids point at, a few byte pieces and the first words.
        kept = [raw for raw, _ in pieces[:3]] + [raw for raw, kind in pieces if kind == 6][:16] + \
            [raw for raw, kind in pieces if kind == 1][:120]
        rest = b"".join(raw if number != 2 else field(2, trainer_spec(value)) for number, raw, value in fields
                        if number != 1)
        (out / f"{name}.model").write_bytes(b"".join(kept) + rest)


def jsonl_data_seeds():
    out = target("jsonl_data")
    sources = sorted((ROOT / "examples" / "data").glob("*/*.jsonl")) + [
        FIXTURES / "models" / "llama2" / "data.jsonl", FIXTURES / "tokenizers" / "corpus.jsonl"]
    for source in sources:
        lines = source.read_text(encoding="utf-8").rstrip("\n").split("\n")
        seed = "\n".join(lines[:3]) + "\n"
        while len(seed.encode()) > 3000 and "\n" in seed.rstrip("\n"):
            seed = seed.rstrip("\n").rsplit("\n", 1)[0] + "\n"
        if len(seed.encode()) <= 3000:
            (out / f"{source.parent.name}-{source.stem}.jsonl").write_text(seed, encoding="utf-8")
    # Layouts the example data does not show.
    records = {
        "trl-messages": [{"prompt": [{"role": "user", "content": "Hi"}],
                          "chosen": [{"role": "assistant", "content": "Hello"}],
                          "rejected": [{"role": "assistant", "content": "Go away"}], "margin": 1.5}],
        "trl-text": [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "chosen_reward": 1, "rejected_reward": -1}],
        "helpsteer": [{"prompt": "Hi", "response": "Hello", "helpfulness": 4, "correctness": 3, "verbosity": None}],
        "nemo-label": [{"text": "Hi there", "label": [4, 3, -100, 2, 1, None, 0, 0, 1]},
                       {"text": "Hi", "label": "helpfulness:4,correctness:3"}],
        "steerlm": [{"system": "", "mask": "User", "type": "VALUE_TO_TEXT",
                     "conversations": [{"from": "User", "value": "Hi", "label": None},
                                       {"from": "Assistant", "value": "Hello", "label": "helpfulness:4,humor:0"}]}],
        "input-ids": [{"input_ids": [1, 2, 3]}, {"input_ids": [5.0, 0]}],
        "blank-lines": [{"text": "a"}, None, {"text": "b"}],
    }
    for name, lines in records.items():
        text = "".join(("" if r is None else json.dumps(r)) + "\n" for r in lines)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")


def model_config_seeds():
    out = target("model_config")
    for config in sorted((FIXTURES / "models").glob("*/config.json")):
        shutil.copy(config, out / f"{config.parent.name}.json")
    shutil.copy(ROOT / "examples" / "models" / "tiny-llama.config.json", out / "tiny-llama.json")
    base = json.loads((FIXTURES / "models" / "llama3" / "config.json").read_text())
    # transformers 4.x spellings, and a reward model.
    v4 = {k: v for k, v in base.items() if k not in ("rope_parameters", "dtype")}
    v4.update(rope_theta=500000.0, torch_dtype="bfloat16",
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    (out / "llama3-v4.json").write_text(json.dumps(v4, indent=1))
    rm = dict(base, architectures=["LlamaForSequenceClassification"], num_labels=2,
              id2label={"0": "helpfulness", "1": "correctness"}, eos_token_id=[1, 2])
    (out / "reward-model.json").write_text(json.dumps(rm, indent=1))


def config_seeds():
    out = target("config")
    shutil.copy(ROOT / "examples" / "demo_sft.yaml", out / "demo_sft.yaml")
    shutil.copy(ROOT / "examples" / "models" / "tiny-llama.pretrain.yaml", out / "tiny-llama.pretrain.yaml")
    (out / "overrides.txt").write_text("trainer.max_steps=5\noptim.betas=[0.9, 0.95]\nmodel.path=\n"
                                       "data: {max_length: 64, packing: true}\n")


def tokenizer_config_seeds():
    out = target("tokenizer_config")
    tok = FIXTURES / "tokenizers"
    shutil.copy(tok / "gpt2" / "tokenizer_config.json", out / "gpt2.json")
    shutil.copy(tok / "llama3-style-bpe6k" / "tokenizer_config.json", out / "llama3.json")
    mistral = json.loads((tok / "mistral-v0.3" / "tokenizer_config.json").read_text())
    mistral.pop("added_tokens_decoder", None)
    (out / "mistral.json").write_text(json.dumps(mistral, indent=1))
    (out / "template-list.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>", "lstrip": False}, "pad_token": None,
         "chat_template": [{"name": "default", "template": "{{ messages }}"}, {"name": "tool_use", "template": "x"}]}))


def jinja_seeds():
    out = target("jinja")
    for line in (FIXTURES / "chat_templates" / "features.jsonl").read_text(encoding="utf-8").rstrip("\n").split("\n"):
        case = json.loads(line)
        (out / f"{case['name']}.jinja").write_text(case["template"], encoding="utf-8")


def reward_request_seeds():
    out = target("reward_request")
    lines = lambda path, n: [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:n]]
    # Token ids from the model fixture, and code-alpaca's instructions and answers as texts.
    ids = [r["input_ids"] for r in lines(FIXTURES / "models" / "llama2" / "data.jsonl", 3)]
    pairs = [(r["input"][:200], r["output"][:200]) for r in lines(ROOT / "examples" / "data" / "code-alpaca" / "code-alpaca-300.jsonl", 3)]
    bodies = {
        # What the README and the client send.
        "input-ids": {"input_ids": ids},
        "input-ids-edges": {"input_ids": [[0], [5999, 1.0], [4, 4]]},
        "code-alpaca": {"prompts": [p for p, _ in pairs], "responses": [r for _, r in pairs]},
        "texts": {"prompts": ["What is 2+2?", "Hi", ""], "responses": ["4", " Hello there!", "naïve café 東京 🙂"]},
        "empty-lists": {"input_ids": []},
        # Rejected: a field and index to name.
        "id-outside": {"input_ids": [[1], [2, 6000]]},
        "id-negative-float": {"input_ids": [[-1, 2.5]]},
        "empty-sequence": {"input_ids": [[1], []]},
        "both": {"input_ids": [[1]], "prompts": ["a"], "responses": ["b"]},
        "unknown-field": {"prompts": ["a"], "responses": ["b"], "extra": 1},
        "uneven": {"prompts": ["a", "b"], "responses": ["c"]},
        "not-strings": {"prompts": [["a"]], "responses": [None]},
        "too-many": {"input_ids": [[i] for i in range(9)]},
    }
    for name, body in bodies.items():
        (out / f"{name}.json").write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    for name, text in {"not-json": '{"input_ids": [[1, 2', "not-object": "[[1, 2, 3]]",
                       "big-id": '{"input_ids": [[1e300, 9223372036854775807, 18446744073709551615]]}'}.items():
        (out / f"{name}.json").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    safetensors_seeds()
    tokenizer_json_seeds()
    sentencepiece_seeds()
    jsonl_data_seeds()
    model_config_seeds()
    config_seeds()
    tokenizer_config_seeds()
    jinja_seeds()
    reward_request_seeds()
