"""Generate the held-out evaluation sets in tests/data/ (seeded, from the held-out split).

Usage: python make_evalsets.py --out tests/data [--seed 20251123]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

import data as D

SETS_PPL = {"ppl_2k": (2048, 32), "ppl_8k": (8192, 8)}          # name: (tokens incl. BOS, count)
SETS_RET = {"retrieval_2k": (2048, 64), "retrieval_4k": (4096, 64), "retrieval_8k": (8192, 64)}


def ppl_rows(text: bytes, rng, tokens: int, count: int):
    rows = []
    for _ in range(count):
        s = int(rng.integers(0, len(text) - tokens))
        s = text.find(b"\n", s) + 1
        b = text[s:s + tokens - 1]
        t = b.decode("utf-8", errors="ignore")  # drops a cut multi-byte char at the end
        rows.append({"text": t, "n_tokens": 1 + len(t.encode())})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data")
    ap.add_argument("--seed", type=int, default=20251123)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    corpus = D.load_corpus()
    D.cached_train_stream(corpus)  # warms the cache for a train.py run in the same command
    text = D.heldout_text_stream(corpus["heldout_files"])
    manifest = {"seed": a.seed, "corpus": corpus["stats"], "heldout_text_bytes": len(text),
                "command": f"python tools/train/make_evalsets.py --out {a.out} --seed {a.seed}", "files": {}}
    for i, (name, (tokens, count)) in enumerate(SETS_PPL.items()):
        rng = np.random.default_rng([a.seed, i])
        rows = ppl_rows(text, rng, tokens, count)
        _write(a.out, name, rows, manifest)
    for i, (name, (tokens, count)) in enumerate(SETS_RET.items()):
        rng = np.random.default_rng([a.seed, 100 + i])
        rows = []
        for j in range(count):
            depth = (j + rng.random()) / count  # stratified target depth in [0, 1)
            depth = 0.02 + 0.96 * depth
            r = D.make_eval_retrieval(text, rng, tokens, depth, int(rng.integers(3, 9)))
            assert r["n_tokens"] + len(r["suffix"]) <= tokens
            rows.append(r)
        rng.shuffle(rows)
        _write(a.out, name, rows, manifest)
    json.dump(manifest, open(os.path.join(a.out, "manifest.json"), "w"), indent=2)
    print(json.dumps(manifest["files"], indent=1))


def _write(out, name, rows, manifest):
    p = os.path.join(out, name + ".jsonl")
    with open(p, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    b = open(p, "rb").read()
    manifest["files"][name + ".jsonl"] = {"rows": len(rows), "bytes": len(b),
                                          "sha256": hashlib.sha256(b).hexdigest(),
                                          "max_tokens": max(r["n_tokens"] for r in rows)}


if __name__ == "__main__":
    main()
