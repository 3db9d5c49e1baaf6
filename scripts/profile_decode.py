"""Kernel times of one decoding step (a replay of the CUDA graph), by kernel, from Nsight Compute.

Run on the GPU machine after scripts/build_cuda.sh:  python3 scripts/profile_decode.py [BUILD_DIR]
Profiles the second decoding step of bench/generate_bench's setting (256 prompts x 128 tokens, 1.1B
Llama, bf16) and prints the kernels grouped by name with their total and share of the step.
"""
import collections
import csv
import io
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import torch  # noqa: E402
from tinyllama import make_model  # noqa: E402


def main():
    build = sys.argv[1] if len(sys.argv) > 1 else "build-cuda"
    model, folder = make_model(torch.bfloat16)
    del model
    torch.cuda.empty_cache()
    out = subprocess.run(["ncu", "--profile-from-start", "off", "--graph-profiling", "node", "--metrics",
                          "gpu__time_duration.sum", "--csv", f"{build}/generate_bench", folder, "256", "128", "4",
                          "256"], env={**os.environ, "ALIGNER_PROFILE_STEP": "1"}, capture_output=True, text=True)
    rows = [r for r in csv.DictReader(io.StringIO(out.stdout[out.stdout.find('"ID"'):]))
            if r.get("Metric Name") == "gpu__time_duration.sum"]
    if not rows:
        print(out.stdout[-3000:], out.stderr[-3000:])
        return
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    total = collections.defaultdict(float)
    count = collections.Counter()
    for r in rows:
        name = r["Kernel Name"][:70]
        us = float(r["Metric Value"].replace(",", "")) * scale[r["Metric Unit"]]
        total[name] += us
        count[name] += 1
    step = sum(total.values())
    print(f"one decoding step: {len(rows)} kernels, {step / 1e3:.3f} ms of kernel time")
    if os.environ.get("DETAIL"):  # a kernel in depth: DETAIL=regex of its name
        detail = subprocess.run(["ncu", "--profile-from-start", "off", "--graph-profiling", "node", "-k",
                                 f"regex:{os.environ['DETAIL']}", "--launch-count", "1", "--section",
                                 "SpeedOfLight", "--section", "Occupancy", "--section", "WarpStateStats",
                                 "--section", "MemoryWorkloadAnalysis", "--section", "LaunchStats",
                                 f"{build}/generate_bench", folder, "256", "128", "4", "256"],
                                env={**os.environ, "ALIGNER_PROFILE_STEP": "1"}, capture_output=True, text=True)
        lines = [l for l in detail.stdout.splitlines() if l.strip() and not l.startswith("==PROF==")]
        print("\n".join(lines[-120:]))
    print("| kernel | launches | total us | share |")
    print("|---|---|---|---|")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:16]:
        print(f"| {name} | {count[name]} | {us:,.0f} | {us / step:.1%} |")


if __name__ == "__main__":
    main()
