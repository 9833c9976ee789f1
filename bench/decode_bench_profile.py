#!/usr/bin/env python3
"""Per-step kernel-time breakdown of decode_bench from an Nsight Compute CSV.

Run on the GPU machine (see docs/benchmarks.md, "Full-model decode"):
  ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
      decode_bench --modes=dense,random --steps=1 --warmup=0 --gemm=default > prof.csv
  python3 bench/decode_bench_profile.py prof.csv

A step starts at each EmbeddingKernel launch and runs to the next one (or the end, minus the
index-list kernels of the next mode). Kernels are grouped into GEMM (cuBLAS / cublasLt), attention
(paged decode + split merge, generic attention), and the small model ops; the sum of kernel
durations is printed beside the step time measured without the profiler, so the difference is
launch gaps / idle time.
"""
import csv
import sys
from collections import OrderedDict


def category(name):
    n = name.lower()
    if "paged" in n or "mergesplits" in n or "prefillattention" in n or "decode::" in n:
        return "attention"
    if any(k in n for k in ("rmsnorm", "ropeappend", "silumul", "embedding", "argmax",
                            "addresidual")):
        return "model ops"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "splitk", "reduce", "sm90")):
        return "gemm"
    return "other"


def main():
    rows = []
    with open(sys.argv[1]) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3,
                 "ms": 1e3}.get(r.get("Metric Unit", "nsecond"), 1e-3)
        rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", "")) * scale))
    starts = [i for i, (n, _) in enumerate(rows) if "EmbeddingKernel" in n]
    for s_i, start in enumerate(starts):
        end = starts[s_i + 1] if s_i + 1 < len(starts) else len(rows)
        step = rows[start:end]
        # Drop the next mode's list construction (mask / compaction kernels) from this step.
        step = [(n, t) for n, t in step
                if not any(k in n for k in ("MaskKernel", "Count", "Compact", "Fill"))]
        cats = OrderedDict((c, [0, 0.0]) for c in ("gemm", "attention", "model ops", "other"))
        names = OrderedDict()
        for n, t in step:
            c = cats[category(n)]
            c[0] += 1
            c[1] += t
            short = n.split("(")[0][:60]
            names.setdefault(short, [0, 0.0])
            names[short][0] += 1
            names[short][1] += t
        total = sum(t for _, t in step)
        print(f"step {s_i}: {len(step)} kernels, sum of durations {total / 1e3:.3f} ms")
        for c, (k, t) in cats.items():
            print(f"  {c:10s} {k:4d} kernels {t / 1e3:8.3f} ms ({100 * t / max(total, 1e-9):5.1f}%)")
        for n, (k, t) in sorted(names.items(), key=lambda x: -x[1][1])[:12]:
            print(f"    {k:4d} x {t / max(k, 1):9.1f} us  {n}")


if __name__ == "__main__":
    main()
