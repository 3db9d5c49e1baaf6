"""Writes the configs of a small Stable-Diffusion-shaped model (diffusers' folder layout without
weights) that `aligner init` turns into a random model folder: unet/, vae/ and text_encoder/
config.json, a CLIP tokenizer (vocab.json + merges.txt) and a DDIM scheduler.

    python3 scripts/make_tiny_sd_configs.py OUT_DIR [--preset test|demo]

test: the smallest model with every block kind (tests/fixtures/tiny-sd-configs); demo: the one the
diffusion demo trains from scratch on coloured shapes (examples/models/tiny-sd-configs).

The tokenizer is CLIP's format with a tiny vocabulary: the 256 byte-level characters, each also
ending a word ("</w>"), every word of the shapes captions merged into one token left to right, and
CLIP's two special tokens. Needs only the standard library.
"""
import argparse
import json
import os

WORDS = ["a", "an", "on", "background", "circle", "square", "triangle", "red", "green", "blue", "yellow",
         "purple", "orange", "white", "black", "photo", "of", "the"]

PRESETS = {
    "test": {"unet": [8, 16], "vae": [8, 16], "text": 16, "groups": 4, "heads": 2, "sample": 16},
    "demo": {"unet": [32, 64, 64], "vae": [32, 64], "text": 64, "groups": 8, "heads": 4, "sample": 32},
}


def byte_chars():
    """GPT-2's byte-to-unicode table, which CLIP's tokenizer shares."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def tokenizer(out):
    chars = byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    known, merges = set(vocab), []
    for word in WORDS:
        symbols = [chars[b] for b in word.encode()]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 77})
    write_json(os.path.join(out, "special_tokens_map.json"), {"pad_token": "<|endoftext|>"})
    return len(vocab)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="test")
    a = ap.parse_args()
    p = PRESETS[a.preset]
    vocab = tokenizer(os.path.join(a.out, "tokenizer"))
    n = len(p["unet"])
    os.makedirs(os.path.join(a.out, "unet"), exist_ok=True)
    write_json(os.path.join(a.out, "unet", "config.json"), {
        "_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
        "sample_size": p["sample"] // 2 ** (len(p["vae"]) - 1), "block_out_channels": p["unet"],
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "layers_per_block": 1, "norm_num_groups": p["groups"], "cross_attention_dim": p["text"],
        "attention_head_dim": p["heads"]})
    os.makedirs(os.path.join(a.out, "vae"), exist_ok=True)
    write_json(os.path.join(a.out, "vae", "config.json"), {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": p["vae"], "down_block_types": ["DownEncoderBlock2D"] * len(p["vae"]),
        "up_block_types": ["UpDecoderBlock2D"] * len(p["vae"]), "layers_per_block": 1,
        "norm_num_groups": p["groups"], "sample_size": p["sample"], "scaling_factor": 1.0})
    os.makedirs(os.path.join(a.out, "text_encoder"), exist_ok=True)
    write_json(os.path.join(a.out, "text_encoder", "config.json"), {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
        "hidden_size": p["text"], "intermediate_size": 2 * p["text"], "num_hidden_layers": 2,
        "num_attention_heads": p["heads"], "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1})
    os.makedirs(os.path.join(a.out, "scheduler"), exist_ok=True)
    write_json(os.path.join(a.out, "scheduler", "scheduler_config.json"), {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "prediction_type": "epsilon", "timestep_spacing": "leading"})
    print(f"wrote {a.out} ({a.preset}: UNet {p['unet']}, VAE {p['vae']}, text {p['text']}, {vocab} tokens)")


if __name__ == "__main__":
    main()
