#!/usr/bin/python3
"""Plots docs/quality.json (written by `prehoc eval --json`): quality vs real kept fraction.

Usage: /usr/bin/python3 tools/plots/plot_quality.py docs/quality.json docs/quality.png
Needs Debian's python3-matplotlib (apt-get install python3-matplotlib).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    data = json.load(open(src))
    configs = data["configs"]
    dense = next(c for c in configs if c["config"] == "dense")
    sets = sorted(dense.get("retrieval", {}).keys(), key=lambda s: int(s.rstrip("k")))
    policies = []
    for c in configs:
        if c["config"] != "dense" and "delta*" not in c["config"] and c["policy"] not in policies:
            policies.append(c["policy"] + ("+prefill" if "+prefill" in c["config"] else ""))
    policies = list(dict.fromkeys(policies))
    panels = [("bpb_rel_change_pct", "bits/byte vs dense (%)"), ("top1_agreement", "top-1 agreement with dense"),
              ("delta_mean", "mean exact dropped mass δ")]
    panels += [(f"retrieval:{s}", f"retrieval accuracy {s}") for s in sets]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes, panels):
        for p in policies:
            pts = []
            for c in configs:
                name = c["policy"] + ("+prefill" if "+prefill" in c["config"] else "")
                if name != p or "delta*" in c["config"]:
                    continue
                if key.startswith("retrieval:"):
                    y = c["retrieval"][key.split(":")[1]]["accuracy"]
                else:
                    y = c[key]
                pts.append((c["real_kept_fraction"], y))
            pts.sort()
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        if key.startswith("retrieval:"):
            ax.axhline(dense["retrieval"][key.split(":")[1]]["accuracy"], color="k", ls="--", lw=1, label="dense")
        elif key == "top1_agreement":
            ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("real kept fraction (incl. dilation)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prehoc eval on {data['model']} (CPU engine)", fontsize=11)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
