"""Evaluation of exported models on the tests/data sets (bf16 autocast, dense SDPA).

AR:  held-out loss / bits-per-byte on ppl_{2k,8k}.jsonl; retrieval exact match of the
     greedy-decoded value on retrieval_{2k,4k,8k}.jsonl (greedy decoding reproduces the
     answer iff every teacher-forced argmax over the answer positions is right, so one
     forward per example computes it exactly); three greedy sample completions.
DLM: masked-diffusion loss bound (LLaDA ELBO, 8 stratified t per chunk, fixed masks) and
     its bits-per-byte on ppl_2k.jsonl; retrieval on retrieval_2k.jsonl with the value
     replaced by MASK tokens followed by the suffix '"\\n', decoded two ways:
     (a) one-shot argmax of all masked positions, (b) LLaDA low-confidence remasking
     (one token per step, the most confident masked position is fixed first);
     three infill samples.

Usage: python evaluate.py --kind ar|dlm --model DIR --data tests/data [--out metrics.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

from data import BOS, MASK, decode, encode

LN2 = math.log(2)


def read_jsonl(p):
    with open(p, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def _fwd(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(ids).float()


@torch.no_grad()
def ar_ppl(model, rows):
    tot, n = 0.0, 0
    for r in rows:
        ids = torch.tensor([encode(r["text"])], device="cuda")
        lg = _fwd(model, ids[:, :-1])
        tot += F.cross_entropy(lg[0], ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return {"loss_nats_per_byte": tot / n, "bits_per_byte": tot / n / LN2, "bytes": n}


@torch.no_grad()
def ar_retrieval(model, rows, limit=None):
    ok = 0
    per = []
    for r in rows[:limit]:
        p, a = encode(r["prompt"]), list(r["answer"].encode())
        ids = torch.tensor([p + a[:-1]], device="cuda")
        lg = _fwd(model, ids)[0, len(p) - 1:]
        pred = lg.argmax(-1).tolist()
        hit = pred == a
        ok += hit
        per.append({"depth": r["depth"], "hit": bool(hit), "pred_first": decode(pred[:1])})
    n = len(per)
    return {"accuracy": ok / max(1, n), "n": n, "hits": ok,
            "acc_by_depth_quartile": _by_depth(per)}


def _by_depth(per):
    out = []
    for q in range(4):
        s = [x["hit"] for x in per if q / 4 <= x["depth"] < (q + 1) / 4 or (q == 3 and x["depth"] >= 1)]
        out.append(round(sum(s) / len(s), 3) if s else None)
    return out


@torch.no_grad()
def ar_greedy(model, prompt_ids, n):
    ids = list(prompt_ids)
    for _ in range(n):
        lg = _fwd(model, torch.tensor([ids], device="cuda"))
        ids.append(int(lg[0, -1].argmax()))
    return ids[len(prompt_ids):]


@torch.no_grad()
def dlm_ppl(model, rows, K=8, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tot, n = 0.0, 0
    for r in rows:
        x = torch.tensor([encode(r["text"])], device="cuda")
        L = x.shape[1] - 1
        for k in range(K):
            t = (k + 0.5) / K
            m = torch.rand(x.shape, device="cuda", generator=g) < t
            m[:, 0] = False
            xn = torch.where(m, torch.full_like(x, MASK), x)
            lg = _fwd(model, xn)
            ce = F.cross_entropy(lg[0], x[0], reduction="none")
            tot += (ce[m[0]].sum() / t).item() / K
        n += L
    return {"elbo_nats_per_byte": tot / n, "bits_per_byte_bound": tot / n / LN2, "bytes": n,
            "note": "LLaDA ELBO upper bound on NLL, 8 stratified t per chunk, fixed seed"}


@torch.no_grad()
def dlm_decode(model, ids, steps=None):
    """Low-confidence remasking: fix the most confident masked position each step."""
    x = torch.tensor([ids], device="cuda")
    n_mask = int((x == MASK).sum())
    steps = steps or n_mask
    per_step = max(1, math.ceil(n_mask / steps))
    while (x == MASK).any():
        lg = _fwd(model, x)[0]
        lg[:, MASK] = -1e9
        lg[:, 256:] = -1e9  # decode bytes only
        conf, pred = lg.softmax(-1).max(-1)
        m = x[0] == MASK
        conf = torch.where(m, conf, torch.full_like(conf, -1.0))
        k = min(per_step, int(m.sum()))
        idx = conf.topk(k).indices
        x[0, idx] = pred[idx]
    return x[0].tolist()


@torch.no_grad()
def dlm_retrieval(model, rows, limit=None):
    ok1 = okr = 0
    per1, perr = [], []
    for r in rows[:limit]:
        p, a, s = encode(r["prompt"]), list(r["answer"].encode()), list(r["suffix"].encode())
        ids = p + [MASK] * len(a) + s
        lg = _fwd(model, torch.tensor([ids], device="cuda"))[0, len(p):len(p) + len(a)]
        lg[:, 256:] = -1e9
        one = lg.argmax(-1).tolist() == a
        rem = dlm_decode(model, ids)[len(p):len(p) + len(a)] == a
        ok1 += one
        okr += rem
        per1.append({"depth": r["depth"], "hit": bool(one)})
        perr.append({"depth": r["depth"], "hit": bool(rem)})
    n = len(per1)
    return {"accuracy_oneshot_argmax": ok1 / max(1, n),
            "accuracy_lowconf_remasking": okr / max(1, n), "n": n,
            "oneshot_by_depth_quartile": _by_depth(per1),
            "remasking_by_depth_quartile": _by_depth(perr)}


def sample_prompts(ppl_rows, n=3, nbytes=200):
    out = []
    for r in ppl_rows[:n]:
        b = r["text"].encode()[:nbytes]
        b = b[:b.rfind(b"\n") + 1] or b
        out.append(b.decode("utf-8", errors="ignore"))
    return out


def evaluate(kind, model_dir, data_dir, limit=None):
    from export import load_ours
    model = load_ours(model_dir, causal=(kind == "ar"))
    ppl2 = read_jsonl(os.path.join(data_dir, "ppl_2k.jsonl"))
    res = {}
    if kind == "ar":
        ppl8 = read_jsonl(os.path.join(data_dir, "ppl_8k.jsonl"))
        res["heldout_2k"] = ar_ppl(model, ppl2[:limit])
        res["heldout_8k"] = ar_ppl(model, ppl8[:limit])
        for L in ("2k", "4k", "8k"):
            res[f"retrieval_{L}"] = ar_retrieval(model, read_jsonl(os.path.join(data_dir, f"retrieval_{L}.jsonl")), limit)
        res["samples"] = []
        for pr in sample_prompts(ppl2[-3:]):
            out = ar_greedy(model, encode(pr), 160)
            res["samples"].append({"prompt": pr, "completion_greedy": decode(out)})
    else:
        res["heldout_2k"] = dlm_ppl(model, ppl2[:limit])
        res["retrieval_2k"] = dlm_retrieval(model, read_jsonl(os.path.join(data_dir, "retrieval_2k.jsonl")), limit)
        res["samples"] = []
        for pr in sample_prompts(ppl2[-3:]):
            ids = encode(pr) + [MASK] * 96
            out = dlm_decode(model, ids)
            res["samples"].append({"prompt": pr, "infill_96_lowconf_remasking": decode(out[len(encode(pr)):])})
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True, choices=["ar", "dlm"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="tests/data")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    r = evaluate(a.kind, a.model, a.data, a.limit)
    print(json.dumps(r, indent=2, ensure_ascii=False))
    if a.out:
        json.dump(r, open(a.out, "w"), indent=2, ensure_ascii=False)
