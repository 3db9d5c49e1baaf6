"""One DRaFT+ step of Stable Diffusion 1.5's shape, random weights, on one GPU: time and peak memory.

Run on the GPU machine after scripts/build_cuda.sh:  python3 bench/draftp_bench.py [BUILD_DIR]
The model is SD 1.5's UNet and VAE (tests/fixtures/sd15-configs) and CLIP ViT-L/14's text encoder
shape, with random weights in bfloat16; the tokenizer is the tiny CLIP-format one of
tests/fixtures/tiny-sd-configs (tokenisation is not what is timed). One step: 4 prompts, 512 x 512
images, 50 DDIM steps with classifier-free guidance 7.5, gradients through the last step (K = 1),
the VAE decoding and a differentiable reward (reward.kind=redness: the time of a PickScore model is
left out), LoRA rank 32 on the UNet's attention, AdamW. Also the sampling alone: `aligner diffuse`
drawing the same 4 images (50 steps, guidance 7.5), timed from its log. There is no baseline: no
diffusers on the GPU machine (issue 19 asks for a report, no target).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STEPS = 4  # step 1 warms up (allocator, kernels): steps 2..4 are timed


def sd15_configs(dst):
    fixtures = os.path.join(ROOT, "tests", "fixtures")
    for part, src in (("unet", "sd15-configs/unet_config.json"), ("vae", "sd15-configs/vae_config.json")):
        os.makedirs(os.path.join(dst, part))
        shutil.copy(os.path.join(fixtures, src), os.path.join(dst, part, "config.json"))
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(fixtures, "tiny-sd-configs", part), os.path.join(dst, part))
    os.makedirs(os.path.join(dst, "text_encoder"))
    with open(os.path.join(dst, "text_encoder", "config.json"), "w") as f:
        json.dump({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
                   "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                   "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}, f)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
    aligner = os.path.join(build, "aligner")
    work = tempfile.mkdtemp(prefix="draftp_bench_")
    sd15_configs(os.path.join(work, "configs"))
    model = os.path.join(work, "model")
    run([aligner, "init", "--config", os.path.join(work, "configs"), "--out", model])
    prompts = os.path.join(work, "prompts.jsonl")
    with open(prompts, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"a photo of a red circle number {i}"}) + "\n")
    out = os.path.join(work, "run")
    run([aligner, "draftp", "--model", model, f"data.train={prompts}", "reward.kind=redness",
         "model.dtype=bfloat16", "infer.height=512", "infer.width=512", "infer.inference_steps=50",
         "infer.guidance_scale=7.5", "draftp.truncation_steps=1", "trainer.micro_batch_size=4",
         "trainer.global_batch_size=4", f"trainer.max_steps={STEPS}", "lora.rank=32", f"output_dir={out}"])
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"train"' in l]
    timed = rows[1:]
    step_s = sum(r["step_seconds"] for r in timed) / len(timed)
    peak = max(r.get("peak_memory_gb", float("nan")) for r in rows)

    log = run([aligner, "diffuse", "--model", model, "--prompts", prompts, "--out", os.path.join(work, "images"),
               "model.dtype=bfloat16", "infer.height=512", "infer.width=512", "infer.inference_steps=50",
               "infer.batch_size=4"])
    stamps = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S")
              for m in re.findall(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\] \d+ of \d+ images", log)]
    per_batch = (stamps[-1] - stamps[0]).total_seconds() / (len(stamps) - 1) if len(stamps) > 1 else float("nan")

    print("\n| DRaFT+ step, SD 1.5 shape, 512 x 512, 50 DDIM steps, K = 1, 4 images, bf16 | aligner |")
    print("|---|---|")
    print(f"| step time (s), mean of steps 2..{STEPS} | {step_s:.2f} |")
    print(f"| peak GPU memory (GB) | {peak:.1f} |")
    print(f"| sampling alone: 4 images, 50 steps with guidance (s, `aligner diffuse`, 1 s log resolution) | {per_batch:.1f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
