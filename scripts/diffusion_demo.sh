#!/usr/bin/env bash
# The diffusion demo, end to end at small scale: a Stable-Diffusion-shaped model (UNet, VAE and CLIP
# text encoder, examples/models/tiny-sd-configs) trained from scratch on synthetic captioned shapes
# ("a red circle on a blue background"), then aligned with DRaFT+ toward red images (the built-in
# redness reward), and the reward before and after on held-out prompts, with the images side by side.
#   bash scripts/diffusion_demo.sh            # after the build (README's quick start)
# Writes runs/sd-demo/: data/, model/ (the trained model), draftp/ (the adapter, metrics and
# images/step_N/trained_vs_base.png), and prints the rewards. DEVICE=cuda runs it on a GPU; STEPS_*
# scale the three trainings (the defaults take about 20 minutes on two CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
A=build/aligner
R=runs/sd-demo
DEVICE=${DEVICE:-auto}
STEPS_VAE=${STEPS_VAE:-400}
STEPS_UNET=${STEPS_UNET:-1200}
STEPS_DRAFTP=${STEPS_DRAFTP:-40}
common="model.device=$DEVICE data.image_size=32 trainer.micro_batch_size=32 trainer.global_batch_size=32 overwrite=true resume=false"

mkdir -p $R
$A shapes --out $R/data --count 4096 --size 32 --seed 1
# Held-out prompts: the first 8 of another seed's shapes.
$A shapes --out $R/heldout --count 8 --size 32 --seed 2 >/dev/null
$A init --config examples/models/tiny-sd-configs --out $R/init --overwrite

# The autoencoder first (its latents are what the UNet learns), then the UNet on its latents.
$A diffusion-train train.part=vae model.path=$R/init data.train=$R/data/captions.jsonl \
  trainer.max_steps=$STEPS_VAE optim.lr=1e-3 optim.scheduler=cosine optim.warmup_steps=50 $common \
  output_dir=$R/vae
$A diffusion-train train.part=unet model.path=$R/vae/final data.train=$R/data/captions.jsonl \
  data.validation=$R/heldout/prompts.jsonl infer.inference_steps=25 infer.guidance_scale=3 \
  trainer.max_steps=$STEPS_UNET trainer.val_interval=$STEPS_UNET optim.lr=1e-3 optim.scheduler=cosine \
  optim.warmup_steps=100 $common output_dir=$R/unet
rm -rf $R/model && cp -r $R/unet/final $R/model

# DRaFT+: LoRA on the UNet, gradients through the last 2 of 25 DDIM steps; the KL term keeps the
# shapes (with draftp.kl_coeff=0.1 every image turns plain red within ten steps: reward hacking).
$A draftp --model $R/model data.train=$R/data/prompts.jsonl data.validation=$R/heldout/prompts.jsonl \
  reward.kind=redness model.device=$DEVICE infer.height=32 infer.width=32 infer.inference_steps=25 \
  infer.guidance_scale=3 draftp.truncation_steps=2 draftp.kl_coeff=2 lora.rank=8 lora.alpha=8 optim.lr=2e-3 \
  optim.warmup_steps=0 trainer.micro_batch_size=8 trainer.global_batch_size=8 trainer.max_steps=$STEPS_DRAFTP \
  trainer.val_interval=$STEPS_DRAFTP overwrite=true resume=false output_dir=$R/draftp

python3 - "$R" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/draftp/metrics.jsonl") if '"validation"' in l]
before, after = rows[0], rows[-1]
print(f"redness of the held-out prompts' images (mean of r - (g + b) / 2 in [0, 1]):")
print(f"  base model {before['reward_base']:.4f}   after DRaFT+ (step {after['step']}) {after['reward']:.4f}")
print(f"images side by side: {sys.argv[1]}/draftp/images/step_{after['step']}/trained_vs_base.png")
EOF
