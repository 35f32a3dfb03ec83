"""FFAM's attention at the full-resolution level: is there room beyond the SDPA kernel? (issue 18, item 4)

    python benchmarks/video_unet/ffam_kernels.py --frames 8 24 --threads 2

One FFAM layer of the benchmark UNet's first level (--size 16: n = 256 tokens, m = 64 coarse tokens a frame;
--size 8: n = 64, m = 16; 32 channels, 8 heads of 4),
forward + backward with the input requiring grad, as in a train step; min of --repeats, interleaved:
- `ffam processor`: ei2's FineCoarseFrameAttention, all of it (projections, pooling, gathering, SDPA, W_out),
  with the CPU head padding (`frame_attention.scaled_dot_product_attention`) and without it (as before issue 18);
- `its SDPA call`: only the SDPA call it makes, (b f) h n (n + (f-1) m), on prepared tensors, and the same call
  with the 4-wide heads zero-padded to 16 (the same scores and outputs);
- `fine + shared coarse`: the same attention as two SDPA calls without per-frame copies of the coarse keys:
  each frame over its own n tokens, and all f n queries of the clip at once over the f m coarse tokens of the
  clip with a mask that hides each frame's own ones (what "one SDPA call over shared coarse keys" costs at
  least: the merge of the two softmaxes by their log-sum-exp is not counted);
- `its SDPA call, bf16`: the SDPA call in bf16;
- `per-frame SA` and `sparse-causal SDPA`: the same level with n and 2n keys, for scale.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ei2.models import frame_attention
from ei2.models.context import VideoContext
from ei2.models.frame_attention import frame_attention_processor


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def cases(f, size=16, c=32, heads=8):
    d = c // heads
    n, m = size * size, ((size + 1) // 2) ** 2
    torch.manual_seed(0)
    attn = Attention(query_dim=c, heads=heads, dim_head=d)
    ctx = VideoContext()
    ctx.set(f, size, size)
    attn.set_processor(frame_attention_processor("ffam", ctx, 0, 2))
    x = leaf(f, n, c)
    keys = n + (f - 1) * m
    q, k, v = leaf(f, heads, n, d), leaf(f, heads, keys, d), leaf(f, heads, keys, d)
    qb, kb, vb = (leaf(*t.shape, dtype=torch.bfloat16) for t in (q, k, v))
    fq, fk, fv = leaf(f, heads, n, d), leaf(f, heads, n, d), leaf(f, heads, n, d)
    cq, ck, cv = leaf(1, heads, f * n, d), leaf(1, heads, f * m, d), leaf(1, heads, f * m, d)
    own = torch.arange(f).repeat_interleave(n)[:, None] != torch.arange(f).repeat_interleave(m)[None]
    sk, sv = leaf(f, heads, 2 * n, d), leaf(f, heads, 2 * n, d)

    def run(fn):
        def go():
            fn().float().sum().backward()
        return go

    def unpadded():
        pad = frame_attention.CPU_HEAD_PAD
        frame_attention.CPU_HEAD_PAD = 0
        try:
            return attn(x)
        finally:
            frame_attention.CPU_HEAD_PAD = pad

    return {
        "ffam processor": run(lambda: attn(x)),
        "ffam processor, no head padding (before)": run(unpadded),
        "its SDPA call": run(lambda: F.scaled_dot_product_attention(q, k, v)),
        "its SDPA call, heads zero-padded to 16": run(lambda: F.scaled_dot_product_attention(
            *(F.pad(t, (0, 16 - d)) for t in (q, k, v)), scale=d ** -0.5)[..., :d]),
        "fine + shared coarse (2 SDPA calls)": run(lambda: F.scaled_dot_product_attention(fq, fk, fv).sum()
                                                  + F.scaled_dot_product_attention(cq, ck, cv, attn_mask=own).sum()),
        "its SDPA call, bf16": run(lambda: F.scaled_dot_product_attention(qb, kb, vb)),
        "per-frame SA SDPA": run(lambda: F.scaled_dot_product_attention(fq, fk, fv)),
        "sparse-causal SDPA": run(lambda: F.scaled_dot_product_attention(fq, sk, sv)),
    }, f * heads * n * keys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, nargs="+", default=[16], help="latent side (the level's grid)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {args.threads} threads, one FFAM layer at the first level (32 channels, "
             f"8 heads of 4), forward + backward, min of {args.repeats} interleaved", "",
             "| latent | frames | variant | ms | ns per FFAM score |", "|---|---|---|---|---|"]
    for size, f in [(size, f) for size in args.size for f in args.frames]:
        runs, scores = cases(f, size)
        for go in runs.values():
            go()
        best = {name: float("inf") for name in runs}
        for _ in range(args.repeats):
            for name, go in runs.items():
                t0 = time.perf_counter()
                go()
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, t in best.items():
            lines.append(f"| {size}×{size} | {f} | {name} | {t * 1e3:.1f} | {t / scores * 1e9:.2f} |")
        print("\n".join(lines[-len(runs):]), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
