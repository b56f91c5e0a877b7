"""Plain-PyTorch reference for the tiny config: the same MoE written the usual way
(an nn.Module per expert, a Python loop over experts with nonzero/index_add), trained
with torch.optim.AdamW on the same GCIDE tokens, seq 256 x batch 16, on the same threads.
Prints tokens/s; scripts/bench.sh compares it with moe-train's C++ step.

    python3 tests/bench/pytorch_baseline.py --steps 12 [--bf16] [--compile] [--data corpus/gcide.bin]

--compile wraps the model in torch.compile (what a performance-minded user would
write instead of eager); its first steps, which compile, are not timed. A failure
to compile is reported as such, not hidden.
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    def __init__(self, d, f, experts, k, shared):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, f) for _ in range(experts))
        self.shared = SwiGLU(d, f * shared)

    def forward(self, x):
        scores = torch.sigmoid(self.router(x).float())
        probs, idx = scores.topk(self.k, dim=-1)
        probs = (probs / probs.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * probs[token, slot, None])
        return out + self.shared(x)


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, moe, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.ffn = moe if moe is not None else SwiGLU(d, ffn)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, -1, self.hd).split([self.heads, self.kv_heads, self.kv_heads], 2)

        def rope(z):
            z1, z2 = z.chunk(2, -1)
            return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

        q, k = rope(q), rope(k)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.n2(x)
        return x + self.ffn(h.view(b * t, d)).view(b, t, d)


class Model(nn.Module):
    def __init__(self, v=8192, d=256, layers=4, heads=4, kv=2, ffn=1024, dense=1, experts=16, k=4, f=256, shared=1):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.blocks = nn.ModuleList(
            Block(d, heads, kv, None if i < dense else MoE(d, f, experts, k, shared), ffn) for i in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, v, bias=False)
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd // 2) * 2.0 / hd))
        ang = torch.outer(torch.arange(256).float(), inv)
        self.register_buffer("cos", ang.cos()[:, None, :])
        self.register_buffer("sin", ang.sin()[:, None, :])

    def forward(self, tokens):
        x, y = tokens[:, :-1], tokens[:, 1:]
        h = self.emb(x)
        t = x.shape[1]
        for blk in self.blocks:
            h = blk(h, self.cos[:t].to(h.dtype), self.sin[:t].to(h.dtype))
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data", default="corpus/gcide.bin")
    args = p.parse_args()
    torch.manual_seed(0)
    with open(args.data, "rb") as f:
        tokens = torch.frombuffer(bytearray(f.read()), dtype=torch.uint16).to(torch.int64)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    step_fn = torch.compile(model) if args.compile else model
    warmup = 3 if args.compile else 2  # compiled: recompilations for new expert row counts settle
    seq, batch = 256, 16
    gen = torch.Generator().manual_seed(0)
    timed = 0.0
    for step in range(args.steps + warmup):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        x = torch.stack([tokens[s:s + seq + 1] for s in starts])
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = step_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            timed += time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    kind = ("bf16 autocast" if args.bf16 else "fp32") + (" torch.compile" if args.compile else " eager")
    print(f"pytorch {torch.__version__} threads {torch.get_num_threads()} {kind}: "
          f"{params / 1e6:.2f}M params, {args.steps * seq * batch / timed:.0f} tokens/s, last loss {loss.item():.3f}")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # report, do not hide: bench.sh prints this line in its table
        print(f"pytorch baseline failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
