"""Makes the tiny CLIP fixture that tests/test_clip.cpp checks aligner's CLIP against: a random
CLIPModel (text: hidden 32, 2 layers, 4 heads, quick_gelu; vision: hidden 32, 2 layers, 4 heads,
image 32, patch 8, gelu; projection 16) with a tiny CLIP tokenizer written here, a CLIPTextModel copy
of its text tower with Stable Diffusion 1.x's legacy eos_token_id 2, and what transformers computes
with them in float32 on the CPU.

Run on a machine with torch and transformers (the GPU machine; no internet needed), from the repo root:
    python3 scripts/make_clip_fixture.py
Writes tests/fixtures/clip-tiny/ (replacing it):
    config.json, model.safetensors, tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                     the CLIPModel and its fast tokenizer
    tokenizer/                       vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                     (CLIPTokenizer's files, as Stable Diffusion's tokenizer/ holds them)
    text_encoder/                    config.json, model.safetensors (CLIPTextModel, eos_token_id 2)
    expected.safetensors             the reference tensors (names below)
    tokenizer_cases.json             ids of tricky strings from the slow and the fast tokenizer
"""
import json
import os
import shutil

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

OUT = "tests/fixtures/clip-tiny"
TOKENIZER_DIR = os.path.join(OUT, "tokenizer")
TEXT_ENCODER_DIR = os.path.join(OUT, "text_encoder")
MAX_LENGTH = 77

# Words whose byte-level spelling is merged left to right; the merges of different words overlap
# ("h o" of "horse" against "p h" of "photo"), so ranks decide, as in a real vocabulary.
WORDS = ["a", "photo", "of", "cat", "dog", "the", "an", "astronaut", "riding", "horse", "on", "mars",
         "high", "quality", "red", "blue", "car", "house", "painting", "in", "style", "and", "with",
         "sunset", "city", "café", "crème", "déjà", "'s", "apples", "it", "mountain", "sky"]

CAPTIONS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, high quality",
    "a red car in front of the house",
    "",
    # More than 75 tokens: truncated to bos + 75 + eos.
    "a painting of a dog with a blue sky and a sunset over the city " * 6,
]

# Tricky strings. "v4_only": transformers 4's Python CLIPTokenizer (BERT's BasicTokenizer cleanup:
# category C characters dropped, spaces around CJK ideographs) and the tokenizers pipeline
# (CLIPTokenizerFast, and CLIPTokenizer itself where it runs on tokenizers) disagree on these.
CASES = [
    ("a photo of a cat", False),
    ("A PHOTO of a Cat!!", False),
    ("an astronaut riding a horse on mars, high quality", False),
    ("the dog's house isn't red; they'll see", False),
    ("It'S 2024: 3.14 apples & 42%", False),
    ("café crème déjà vu", False),
    ("cafe\u0301 (decomposed)", False),
    ("  extra   spaces \t\n here  ", False),
    ("\u00a0nbsp\u2003em space\u3000ideographic", False),
    ("emoji \U0001F431\U0001F680 and \U0001F44D\U0001F3FD!", False),
    ("\u0130stanbul \u00c5ngstr\u00f6m \u03a3 \u0391\u0392\u0393 \u03c3", False),
    ("UPPER lower MiXeD ((brackets)) [x] {y} --- ...", False),
    ("a<|endoftext|>b <|startoftext|> c", False),
    ("", False),
    ("mountain" * 20, False),
    ("family \U0001F468\u200d\U0001F469\u200d\U0001F467", True),
    ("\u4e2d\u6587text\u65e5\u672c", True),
    ("tab\tand\u0007bell\u200bzero-width", True),
]


def bytes_to_unicode():
    # GPT-2's byte -> printable character map, which CLIP uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer_files(path):
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    known = set(vocab)
    merges = []
    enc = bytes_to_unicode()
    for word in WORDS:
        symbols = [enc[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, indent=2, sort_keys=True)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>"}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    config = dict(specials, model_max_length=MAX_LENGTH, tokenizer_class="CLIPTokenizer")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(vocab), len(merges)


def force_python_rules_without_ftfy(tok):
    """transformers 4's CLIPTokenizer cleans text with ftfy when it is installed: the fixture records
    the fallback (BERT's BasicTokenizer), which aligner implements. Returns the backend's name."""
    if not (hasattr(tok, "bpe_ranks") and hasattr(tok, "byte_encoder")):
        return "tokenizers"  # transformers 5: CLIPTokenizer runs the tokenizers pipeline
    from transformers.models.clip import tokenization_clip
    try:
        tok.nlp = tokenization_clip.BasicTokenizer(strip_accents=False, do_split_on_punc=False)
    except TypeError:
        tok.nlp = tokenization_clip.BasicTokenizer(strip_accents=False)
    tok.fix_text = None
    return "python"


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    vocab_size, n_merges = write_tokenizer_files(TOKENIZER_DIR)
    slow = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    slow_backend = force_python_rules_without_ftfy(slow)
    fast_cls = getattr(transformers, "CLIPTokenizerFast", CLIPTokenizer)
    fast = fast_cls.from_pretrained(TOKENIZER_DIR)
    assert len(slow) == vocab_size and len(fast) == vocab_size, (len(slow), len(fast), vocab_size)

    text_config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5, projection_dim=16, bos_token_id=slow.bos_token_id,
                       eos_token_id=slow.eos_token_id, pad_token_id=slow.pad_token_id)
    vision_config = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5,
                         projection_dim=16)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16,
                        logit_scale_init_value=2.6592)
    torch.manual_seed(0)
    model = CLIPModel(config).float().eval()
    with torch.no_grad():
        # CLIP's init leaves biases at 0 and norms at 1, which would hide a swapped weight and bias.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(OUT)
    fast.save_pretrained(OUT)
    for extra in ("vocab.json", "merges.txt", "added_tokens.json"):  # the fast tokenizer's folder: tokenizer.json only
        if os.path.exists(os.path.join(OUT, extra)):
            os.remove(os.path.join(OUT, extra))
    assert os.path.exists(os.path.join(OUT, "tokenizer.json")), "the fast tokenizer wrote no tokenizer.json"

    legacy = CLIPTextConfig(**dict(text_config, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    text_encoder = CLIPTextModel(legacy).float().eval()
    # The text tower's weights under Stable Diffusion's names (text_model.*), written directly: how
    # CLIPTextModel nests its modules differs between transformers 4 and 5.
    tower = {k: v for k, v in model.state_dict().items() if k.startswith("text_model.")}
    own = text_encoder.state_dict()
    text_encoder.load_state_dict({k: tower[k if k.startswith("text_model.") else "text_model." + k] for k in own})
    legacy.save_pretrained(TEXT_ENCODER_DIR)
    save_file({k: v.contiguous() for k, v in tower.items()}, os.path.join(TEXT_ENCODER_DIR, "model.safetensors"),
              metadata={"format": "pt"})

    enc = slow(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    enc_fast = fast(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, enc_fast.input_ids), "slow and fast tokenizers disagree on the captions"
    ids, mask = enc.input_ids.long(), enc.attention_mask.long()

    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    images = torch.rand(2, 3, 40, 48, generator=g)  # not square: resize 40 -> 32, 48 -> 38, crop 3 columns
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        text = model.text_model(input_ids=ids)
        text_masked = model.text_model(input_ids=ids, attention_mask=mask)
        text_embeds = model.text_projection(text.pooler_output)
        vision = model.vision_model(pixel_values=pixels)
        image_embeds = model.visual_projection(vision.pooler_output)
        logits = model(input_ids=ids, pixel_values=pixels).logits_per_image
        legacy_pooled = text_encoder(input_ids=ids).pooler_output

        resized = F.interpolate(images, size=(32, 38), mode="bicubic", align_corners=False, antialias=True)
        processed = (resized[:, :, :, 3:35] - mean) / std
        img = model.visual_projection(model.vision_model(pixel_values=processed).pooler_output)
        txt = text_embeds[:2]
        scores = model.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)

    expected = {
        "input_ids": ids, "attention_mask": mask,
        "text_last_hidden_state": text.last_hidden_state, "text_pooled": text.pooler_output,
        "text_last_hidden_state_masked": text_masked.last_hidden_state,
        "text_pooled_masked": text_masked.pooler_output,
        "text_embeds": text_embeds,
        "pixel_values": pixels, "vision_last_hidden_state": vision.last_hidden_state,
        "vision_pooled": vision.pooler_output, "image_embeds": image_embeds,
        "logits_per_image": logits,
        "legacy_text_pooled": legacy_pooled,
        "preprocess_images": images, "preprocess_pixels": processed, "clip_scores": scores,
    }
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(OUT, "expected.safetensors"))

    cases = []
    for text, v4_only in CASES:
        cases.append({"text": text, "v4_only": v4_only, "slow": slow(text)["input_ids"],
                      "fast": fast(text)["input_ids"]})
    with open(os.path.join(OUT, "tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "slow_backend": slow_backend, "captions": CAPTIONS, "cases": cases}, f,
                  ensure_ascii=False, indent=1)

    total = sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(OUT) for name in names)
    assert total < 1 << 20, f"{OUT} is {total} bytes, over 1 MB"
    differ = sum(c["slow"] != c["fast"] for c in cases)
    print(f"{OUT}: {total} bytes; vocab {vocab_size}, {n_merges} merges; slow tokenizer backend {slow_backend}, "
          f"{differ} of {len(cases)} cases differ between slow and fast; transformers {transformers.__version__}, "
          f"logits_per_image {logits.flatten().tolist()}")


if __name__ == "__main__":
    main()
