#!/usr/bin/env python3
"""Merges prhs_attention_bench's JSON and peer_attention.py's JSON (one device run) into
docs/benchmarks/prhs_attention.json (every measurement plus ratios) and prints the Markdown table
used in docs/benchmarks.md, with the issue-5 target (attention operator >= 9.9x dense at 1/8
budget) marked met or MISSED per row.

  python3 tools/bench/report_prhs.py --run NAME:OURS.json:PEER.json[:OURS_UNMATCHED.json] ...
      [--out docs/benchmarks/prhs_attention.json] [--command "..."] [--note "..."] [--target 9.9]
Each --run is one device run (ours and the peer from the same command, so ratios are same-run).
"""
import argparse
import json

TARGET = 9.9


def load(path):
    with open(path) as f:
        return json.load(f)


def rows_for(ours, peer, target):
    by = {}
    for r in ours["records"]:
        by[(r["op"], r["ctx"], round(r["rate"], 3))] = r
    sdpa = {r["ctx"]: r["us"] for r in peer["records"]
            if r["op"] == "sdpa_dense" and r["batch"] == ours["batch"]
            and r["kv_heads"] == ours["kv_heads"]}
    gather = {r["ctx"]: r["us"] for r in peer["records"]
              if r["op"] == "gather_sdpa" and r["batch"] == ours["batch"]
              and r["kv_heads"] == ours["kv_heads"] and r["keep"] == ours["budget"]}
    out = []
    for ctx in sorted({r["ctx"] for r in ours["records"]}):
        dense = by[("dense", ctx, -1.0)]["us"]
        attn = by[("sparse_attn", ctx, -1.0)]["us"]
        rates = sorted(r["rate"] for r in ours["records"] if r["op"] == "prhs" and r["ctx"] == ctx)
        for rate in rates:
            p = by[("prhs", ctx, round(rate, 3))]
            sel = by[("prhs_select", ctx, round(rate, 3))]["us"]
            ratio = dense / p["us"]
            verdict = "met" if ratio >= target else (
                f"MISSED: {ratio:.2f}x < {target}x ({ratio / target * 100:.0f}% of target)")
            out.append(dict(
                ctx=ctx, rate=rate, kept_fraction=p["kept_fraction"], k=p["k"],
                budget_tokens=p["budget_tokens"], refreshed_rows=p["refreshed_rows"],
                gate_us=p["gate_us"], score_us=p["score_us"], select_us=p["select_us"],
                lists_us=p["lists_us"], attn_stage_us=p["attn_us"], selection_us=sel,
                prhs_us=p["us"], dense_us=dense, sparse_attn_us=attn, sdpa_us=sdpa.get(ctx),
                gather_sdpa_us=gather.get(ctx), dense_over_prhs=ratio,
                sdpa_over_prhs=(sdpa[ctx] / p["us"]) if ctx in sdpa else None,
                dense_over_sparse_attn=dense / attn, bytes_bound=1.0 / p["kept_fraction"],
                target=verdict))
    return out


def table(rows, title):
    print(f"\n{title}\n")
    print("| ctx | r | kept (real) | gate µs | score µs | select µs | lists µs | attn µs | "
          "PrHS step µs | ours dense µs | SDPA µs | dense / PrHS | SDPA / PrHS | target ≥ 9.9× |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        sd = f"{r['sdpa_us']:.1f}" if r["sdpa_us"] else "—"
        so = f"{r['sdpa_over_prhs']:.2f}×" if r["sdpa_over_prhs"] else "—"
        print(f"| {r['ctx'] // 1024}K | {r['rate']:.2f} | {r['kept_fraction']:.3f} | "
              f"{r['gate_us']:.1f} | {r['score_us']:.1f} | {r['select_us']:.1f} | "
              f"{r['lists_us']:.1f} | {r['attn_stage_us']:.1f} | **{r['prhs_us']:.1f}** | "
              f"{r['dense_us']:.1f} | {sd} | {r['dense_over_prhs']:.2f}× | {so} | {r['target']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True,
                    help="NAME:OURS.json:PEER.json[:OURS_NOT_BUDGET_MATCHED.json] (one device run)")
    ap.add_argument("--out", default="")
    ap.add_argument("--command", default="")
    ap.add_argument("--note", default="")
    ap.add_argument("--target", type=float, default=TARGET)
    a = ap.parse_args()
    result = dict(command=a.command, note=a.note,
                  target=f"attention operator >= {a.target}x our dense kernel at 1/8 budget",
                  runs={})
    for spec in a.run:
        parts = spec.split(":")
        name, ours, peer = parts[0], load(parts[1]), load(parts[2])
        rows = rows_for(ours, peer, a.target)
        table(rows, f"[{name}] budget-matched (k = (B - sink - local) / (1 + 2r/3)), "
                    f"{ours['device']}")
        print("\nSparse attention alone and the byte bound:\n")
        print("| ctx | ours dense µs | sparse attn µs | dense / sparse attn | 1 / kept | "
              "gather+SDPA µs |")
        print("|---:|---:|---:|---:|---:|---:|")
        seen = set()
        for r in rows:
            if r["ctx"] in seen:
                continue
            seen.add(r["ctx"])
            g = f"{r['gather_sdpa_us']:.1f}" if r["gather_sdpa_us"] else "—"
            print(f"| {r['ctx'] // 1024}K | {r['dense_us']:.1f} | {r['sparse_attn_us']:.1f} | "
                  f"{r['dense_over_sparse_attn']:.2f}× | {r['bytes_bound']:.2f}× | {g} |")
        run = dict(device=ours["device"], torch=peer.get("torch"), copy_gbs=peer.get("copy_gbs"),
                   shape=dict(batch=ours["batch"], q_heads=ours["q_heads"],
                              kv_heads=ours["kv_heads"], head_dim=ours["head_dim"],
                              dtype="bf16", budget=f"1/{ours['budget']}"),
                   budget_matched=rows, ours_raw=ours["records"], peer_raw=peer["records"])
        if len(parts) > 3:
            un = load(parts[3])
            urows = rows_for(un, peer, a.target)
            table(urows, f"[{name}] not budget-matched (k = B - sink - local, dilation on top)")
            run["not_budget_matched"] = urows
            run["not_budget_matched_raw"] = un["records"]
        result["runs"][name] = run
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
