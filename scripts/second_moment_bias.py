#!/usr/bin/env python3
"""How storing AdamW's second moment in FP8 biases it (docs/optimizer.md).

Emulates the optimizer's FP8 second-moment store (the square root of v, E4M3 in
1 x 128 tiles with the scale max-abs / 448) over 300 steps of v = b2 v + (1 - b2) g^2,
b2 = 0.95, against FP32, BF16 and the same FP8 store rounded stochastically. The
gradients are Gaussian and shrink 3x over the run (dense), or reach each value
with probability 0.05 a step (sparse, like a rare token's row). Prints the
median of v_stored / v_fp32 (the bias of the moment), and the mean and the
standard deviation over elements of sqrt(v_fp32 / v_stored), each element's
AdamW step size over FP32's (its bias, and the noise the store adds to it).
Deterministic (seed 0); CPU PyTorch only.
    python3 scripts/second_moment_bias.py
"""
import torch

B2, TILE, STEPS, N = 0.95, 128, 300, 128 * 256


def fp8_tiles(v, stochastic, gen):
    r = v.clamp_min(0).sqrt().view(-1, TILE)
    scale = (r.amax(1, keepdim=True) / 448.0).clamp_min(1e-30)
    x = (r / scale).clamp(0, 448)
    nearest = x.to(torch.float8_e4m3fn)
    if stochastic:  # the two E4M3 neighbours (positive codes order as their values), up with probability of the distance
        code = nearest.view(torch.uint8).to(torch.int32)
        lo_code = torch.where(nearest.to(torch.float32) > x, code - 1, code).clamp_min(0)
        lo = lo_code.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        hi = (lo_code + 1).clamp_max(126).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
        p = torch.where(hi > lo, (x - lo) / (hi - lo), torch.zeros_like(x))
        q = torch.where(torch.rand(x.shape, generator=gen) < p, hi, lo)
    else:
        q = nearest.to(torch.float32)
    return ((q * scale) ** 2).view(v.shape)


def run(kind, sparse):
    gen = torch.Generator().manual_seed(0)
    v32 = torch.zeros(N)
    v = torch.zeros(N)
    for t in range(STEPS):
        g = torch.randn(N, generator=gen)
        g = g * (torch.rand(N, generator=gen) < 0.05) if sparse else g * (1.0 - 2.0 / 3.0 * t / STEPS)
        v32 = B2 * v32 + (1 - B2) * g * g
        nxt = B2 * v + (1 - B2) * g * g
        if kind == "bf16":
            v = nxt.to(torch.bfloat16).to(torch.float32)
        else:
            v = fp8_tiles(nxt, kind == "fp8_stochastic", gen)
    seen = v32 > 0
    step = (v32[seen] / v[seen].clamp_min(1e-30)).sqrt()  # each element's step size over FP32's
    return f"{(v[seen] / v32[seen]).median().item():.3f} | {step.mean().item():.3f} ± {step.std().item():.3f}"


print("| store of v | dense: median v / v_fp32 | dense: step size / FP32's | sparse: median v / v_fp32 | sparse: step size / FP32's |")
print("|---|---|---|---|---|")
for kind in ("bf16", "fp8_nearest", "fp8_stochastic"):
    print(f"| {kind} | {run(kind, False)} | {run(kind, True)} |")
