"""The attention kernels torch offers for the 1.1B SFT step's shapes, forward and backward, side by side.

Run on the GPU machine:  python3 bench/attention_bench.py
TinyLlama's heads (32 query heads, 4 key/value heads, head size 64), bf16, causal, 8 rows of 2048 tokens:
whole rows (bench/sft_bench's step) and rows packed with two examples of 1,600 and 448 tokens each
(`aligner sft` on packed data: varlen kernels given each example's offsets). TFLOP/s count the causal
half of the score matrix, the backward pass as 2.5 forwards. Which kernel the transformer calls is
decided in src/core/torch_compat.h; this table is what that choice rests on.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B, T, H, HKV, D = 8, 2048, 32, 4, 64
SEGMENTS = [1600, 448]  # one packed row's examples
WARMUP, ITERS = 3, 10


def timed(fn):
    """ms of fn() forward and of forward + backward, by CUDA events."""
    for _ in range(WARMUP):
        fn().sum().backward()
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    fwd = both = 0.0
    for _ in range(ITERS):
        start.record()
        out = fn()
        mid.record()
        out.backward(torch.ones_like(out))
        end.record()
        torch.cuda.synchronize()
        fwd += start.elapsed_time(mid)
        both += start.elapsed_time(end)
    return fwd / ITERS, both / ITERS


def leaves(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(True)


def main():
    rows = []
    whole_flops = 2 * B * T * T * H * D  # forward, causal half (2 matmuls x 2 flops x T^2 / 2)
    packed_flops = 2 * B * sum(s * s for s in SEGMENTS) * H * D

    def row(name, flops, fn):
        try:
            f, fb = timed(fn)
        except Exception as e:  # noqa: BLE001 - a kernel this torch or GPU does not offer is a row saying so
            rows.append((name, None, None, None, f"{type(e).__name__}: {' '.join(str(e).split())[:90]}"))
            return
        rows.append((name, f, fb - f, 3.5 * flops / (fb * 1e-3) / 1e12, ""))

    q, k, v = leaves(B, H, T, D), leaves(B, HKV, T, D), leaves(B, HKV, T, D)
    # Heads repeated for kernels without grouped-query attention (dim 1: heads of [B, H, T, D] and of [N, H, D]).
    kr = lambda t: t.repeat_interleave(H // HKV, dim=1)  # noqa: E731
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                          ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        def whole(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def repeated(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kr(k), kr(v), is_causal=True)
        row(f"{name}, whole rows, grouped heads", whole_flops, whole)
        row(f"{name}, whole rows, heads repeated", whole_flops, repeated)

    # Packed: tokens flattened, offsets of each example.
    lengths = SEGMENTS * B
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device="cuda", dtype=torch.int32)
    n = B * T
    qt, kt, vt = leaves(n, H, D), leaves(n, HKV, D), leaves(n, HKV, D)

    def flash_varlen():
        return torch.ops.aten._flash_attention_forward(qt, kt, vt, cu, cu, max(SEGMENTS), max(SEGMENTS), 0.0, True,
                                                       False, scale=D ** -0.5)[0]
    row("flash varlen, packed rows", packed_flops, flash_varlen)

    # cuDNN's ragged layout (its nested-tensor path): [tokens, heads, D] with cumulative offsets.
    def cudnn_varlen(k, v):
        return torch.ops.aten._cudnn_attention_forward(qt, k, v, None, cu, cu, max(SEGMENTS), max(SEGMENTS), True,
                                                       0.0, True, False, scale=D ** -0.5)[0]
    row("cuDNN varlen (cumulative offsets), packed rows, grouped heads", packed_flops, lambda: cudnn_varlen(kt, vt))
    row("cuDNN varlen (cumulative offsets), packed rows, heads repeated", packed_flops,
        lambda: cudnn_varlen(kr(kt), kr(vt)))

    # cuDNN builds an execution plan per shape: what a row length not seen before costs once.
    plans = []
    for t in (1000, 1001, 1537):
        qn, kn, vn = leaves(1, H, t, D), leaves(1, HKV, t, D), leaves(1, HKV, t, D)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            times = []
            for _ in range(2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(qn, kn, vn, is_causal=True, enable_gqa=True).sum().backward()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
        plans.append(f"{t} tokens: first {times[0]:.1f} ms, again {times[1]:.2f} ms")

    print(f"\nattention, bf16, {B} x {T} tokens, {H} heads / {HKV} kv heads x {D}, causal; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| kernel | forward ms | backward ms | TFLOP/s (fwd + bwd) | note |")
    print("|---|---|---|---|---|")
    for name, f, b, tf, note in rows:
        if f is None:
            print(f"| {name} | - | - | - | {note} |")
        else:
            print(f"| {name} | {f:.2f} | {b:.2f} | {tf:.0f} | {note} |")
    print("cuDNN forward + backward of one row of a new length (its plan built): " + "; ".join(plans))


if __name__ == "__main__":
    main()
