#!/usr/bin/env python3
"""PyTorch peer for bench/attention_bench: SDPA dense decode, gather + SDPA sparse decode, and the
device-to-device copy bandwidth, on the same shapes and with the same timing method (CUDA events
per repetition, median, rotating input sets so L2 is not measured, a GPU spin queued first so
host launch overhead is not timed).

  python3 tools/bench/peer_attention.py [--batch 1,8,16] [--kv-heads 32,8]
      [--ctx 4096,16384,65536,131072] [--keep 8,16,32] [--reps 30] [--json PATH]

Dense: the KV cache is contiguous [B, Hkv, L, D] (the best case for SDPA, no paging). Two call
forms are timed and the faster is the peer: `sdpa(q[B,Hq,1,D], k, v, enable_gqa=True)` and the
grouped form `sdpa(q.view(B,Hkv,G,D), k, v)` (the same function: the G query heads of a group
become G query rows). Sparse: per (b, kv head) a stratified random set of ceil(L/keep) token
positions (the same scheme as attention_bench); the timed op is index_select of the selected K and
V rows + grouped SDPA over them. The flat row indices are precomputed (not timed).
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def parse_list(s):
    return [int(x) for x in s.split(",") if x]


def time_us(fn, reps):
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda._sleep(int(2e9 * (0.003 + reps * 200e-6)))  # ~cycles; keeps the queue ahead
    for i in range(reps):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends))
    return t[reps // 2]


def copy_bandwidth_gbs():
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.fill_(1)
    us = time_us(lambda i: (b if i % 2 == 0 else a).copy_(a if i % 2 == 0 else b), 20)
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n / us / 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8,16")
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--ctx", default="4096,16384,65536,131072")
    ap.add_argument("--keep", default="8,16,32")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    D, HQ = args.head_dim, args.q_heads
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {dev}, torch {torch.__version__}")
    print(f"device-to-device copy: {copy_gbs:.1f} GB/s (bytes read + written)")
    records = []

    def record(op, b, hkv, ctx, keep, us, kv_bytes, note=""):
        r = dict(impl="torch", op=op, dtype=args.dtype, batch=b, kv_heads=hkv, q_heads=HQ,
                 head_dim=D, ctx=ctx, keep=keep, us=round(us, 3), kv_bytes=kv_bytes,
                 bw_kv_gbs=round(kv_bytes / us / 1e3, 1), note=note)
        records.append(r)
        print(f"{op:20s} B={b:<2d} Hkv={hkv:<2d} ctx={ctx:<6d} keep=1/{keep:<2d} {us:9.1f} us  "
              f"kv {kv_bytes / us / 1e3:7.1f} GB/s {note}", flush=True)

    for hkv in parse_list(args.kv_heads):
        G = HQ // hkv
        for b in parse_list(args.batch):
            for ctx in parse_list(args.ctx):
                set_bytes = b * hkv * ctx * D * 2 * 2
                sets = max(1, min(32, (512 << 20) // set_bytes + 1))
                free, _ = torch.cuda.mem_get_info()
                need = sets * set_bytes + set_bytes // 8 * 2 + (2 << 30)
                if need > free:
                    print(f"skip B={b} Hkv={hkv} ctx={ctx}: needs {need / 1e9:.1f} GB, "
                          f"{free / 1e9:.1f} GB free", flush=True)
                    continue
                k = torch.empty(sets, b, hkv, ctx, D, dtype=dtype, device="cuda").uniform_(-1, 1)
                v = torch.empty(sets, b, hkv, ctx, D, dtype=dtype, device="cuda").uniform_(-1, 1)
                q = torch.empty(sets, b, HQ, 1, D, dtype=dtype, device="cuda").uniform_(-1, 1)
                kv_bytes = b * hkv * ctx * D * 4

                best = None
                for form in ("grouped", "gqa"):
                    if form == "grouped":
                        fn = lambda i: F.scaled_dot_product_attention(
                            q[i % sets].view(b, hkv, G, D), k[i % sets], v[i % sets])
                    else:
                        fn = lambda i: F.scaled_dot_product_attention(
                            q[i % sets], k[i % sets], v[i % sets], enable_gqa=True)
                    try:
                        # Fused backends only: the math fallback materialises the scores (and,
                        # with enable_gqa, repeated K/V) and is not what anyone serves with.
                        with sdpa_kernel(FUSED):
                            us = time_us(fn, args.reps)
                    except Exception as e:  # a backend may refuse a form
                        print(f"sdpa form {form}: no fused backend ({str(e)[:200]})",
                              file=sys.stderr)
                        continue
                    record(f"sdpa_dense_{form}", b, hkv, ctx, 1, us, kv_bytes)
                    best = us if best is None else min(best, us)
                if best is not None:
                    record("sdpa_dense", b, hkv, ctx, 1, best, kv_bytes, "best form")

                for keep in parse_list(args.keep):
                    n = (ctx + keep - 1) // keep
                    base = torch.arange(n, device="cuda") * keep
                    width = torch.clamp(ctx - base, max=keep)
                    rows = torch.arange(b * hkv, device="cuda").view(b * hkv, 1) * ctx
                    flat = []
                    for s in range(sets):
                        off = (torch.rand(b * hkv, n, device="cuda") * width).long()
                        flat.append((rows + base + off).view(-1) + s * b * hkv * ctx)
                    kf = k.view(-1, D)
                    vf = v.view(-1, D)

                    def make(gather, form):
                        def sparse(i):
                            idx = flat[i % sets]
                            if gather == "index_select":
                                ks = kf.index_select(0, idx).view(b, hkv, n, D)
                                vs = vf.index_select(0, idx).view(b, hkv, n, D)
                            else:
                                ks = kf[idx].view(b, hkv, n, D)
                                vs = vf[idx].view(b, hkv, n, D)
                            if form == "grouped":
                                return F.scaled_dot_product_attention(
                                    q[i % sets].view(b, hkv, G, D), ks, vs)
                            return F.scaled_dot_product_attention(q[i % sets], ks, vs,
                                                                  enable_gqa=True)
                        return sparse

                    best = None
                    for gather in ("index_select", "indexing"):
                        for form in ("grouped", "gqa"):
                            try:
                                with sdpa_kernel(FUSED):
                                    us = time_us(make(gather, form), args.reps)
                            except Exception as e:
                                print(f"gather {gather} / sdpa {form}: failed ({str(e)[:200]})",
                                      file=sys.stderr)
                                continue
                            record(f"gather_sdpa_{gather}_{form}", b, hkv, ctx, keep, us,
                                   b * hkv * n * D * 4)
                            best = us if best is None else min(best, us)
                    if best is not None:
                        record("gather_sdpa", b, hkv, ctx, keep, best, b * hkv * n * D * 4,
                               "best form")
                    del flat
                del k, v, q
                torch.cuda.empty_cache()

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, torch=torch.__version__, copy_gbs=round(copy_gbs, 1),
                           records=records), f, indent=1)


if __name__ == "__main__":
    main()
