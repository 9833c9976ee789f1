"""Train one prehoc model (AR or masked-diffusion DLM), export it, evaluate it, make fixtures.

Everything happens in one process so that a single <= 10 minute command on the GPU machine
produces a shippable model directory:

  python tools/train/train.py --kind ar  --out /tmp/ar  --train-seconds 450
  python tools/train/train.py --kind dlm --out /tmp/dlm --train-seconds 450

Outputs under --out: model/ (HF directory + README inputs), fixtures/, summary.json.
Training stops itself by wall clock (the LR schedule is cosine over that wall-clock budget).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

T_PROCESS = time.time()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data as D  # noqa: E402
from model import Cfg, LlamaLM, n_params  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True, choices=["ar", "dlm"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="tests/data")
    ap.add_argument("--train-seconds", type=float, default=450)
    ap.add_argument("--seq", type=int, default=None, help="context (default ar 8192, dlm 2048)")
    ap.add_argument("--short-seq", type=int, default=2048, help="AR warm-up context")
    ap.add_argument("--short-frac", type=float, default=0.2, help="AR: fraction of time at short-seq")
    ap.add_argument("--tokens-per-step", type=int, default=131072)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--retrieval-frac", type=float, default=0.10)
    ap.add_argument("--force-mask-frac", type=float, default=0.5,
                    help="DLM: fraction of retrieval rows whose final value is always masked")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-limit", type=int, default=None)
    a = ap.parse_args()
    is_ar = a.kind == "ar"
    seq = a.seq or (8192 if is_ar else 2048)
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    print(f"torch {torch.__version__} cuda {torch.version.cuda} dev {torch.cuda.get_device_name()}", flush=True)
    stream, stats = D.cached_train_stream()
    print(f"train stream: {len(stream)} tokens, loaded at +{time.time() - T_PROCESS:.1f}s", flush=True)

    cfg = Cfg(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
              num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=64,
              rope_theta=a.rope_theta, max_position_embeddings=8192 if is_ar else seq, causal=is_ar)
    model = LlamaLM(cfg).cuda()
    npar = n_params(model)
    print(f"params {npar} ({npar / 1e6:.2f}M) cfg {cfg}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    nodecay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    fwd = torch.compile(model, dynamic=False) if a.compile else model
    batcher = D.Batcher(stream, seed=a.seed + 1, retrieval_frac=a.retrieval_frac)
    gen = torch.Generator(device="cuda").manual_seed(a.seed + 2)
    rng = np.random.default_rng(a.seed + 3)

    curve = []
    step = tokens = 0
    acc_loss = torch.zeros((), device="cuda")
    acc_n = 0
    t0 = time.time()
    t_log, tok_log = t0, 0
    while True:
        el = time.time() - t0
        if el >= a.train_seconds:
            break
        frac = el / a.train_seconds
        cur = seq if (not is_ar or frac >= a.short_frac) else min(a.short_seq, seq)
        rows = max(1, a.tokens_per_step // cur)
        lr = a.lr * min(1.0, (step + 1) / a.warmup_steps) * (
            a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        log_now = (step + 1) % a.log_every == 0
        if is_ar:
            x_np, spans = batcher.batch(rows, cur)
            x = torch.from_numpy(x_np).pin_memory().cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(x[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        else:
            x_np, spans = batcher.batch(rows, cur - 1)
            x = torch.from_numpy(x_np).pin_memory().cuda(non_blocking=True)
            eps = 1e-3
            t = (1 - eps) * torch.rand(rows, device="cuda", generator=gen) + eps
            m = torch.rand(x.shape, device="cuda", generator=gen) < t[:, None]
            m[:, 0] = False
            forced = [(r, s) for r, s in enumerate(spans) if s is not None and rng.random() < a.force_mask_frac]
            for r, (s0, s1) in forced:
                m[r, s0:s1] = True
            spans = [None] * rows  # probe only rows whose answer was surely masked
            for r, sp in forced:
                spans[r] = sp
            xn = torch.where(m, torch.full_like(x, D.MASK), x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(xn)
            ce = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x.reshape(-1),
                                 reduction="none").view_as(x)
            loss = (ce * m / t[:, None]).sum() / x.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc_loss += loss.detach()
        acc_n += 1
        step += 1
        tokens += rows * cur
        if log_now:
            racc = _retrieval_probe(logits, x_np, spans, is_ar)
            now = time.time()
            rec = {"step": step, "tokens": tokens, "sec": round(now - t0, 1), "seq": cur,
                   "lr": round(lr, 6), "loss": round(acc_loss.item() / acc_n, 4),
                   "gnorm": round(float(gn), 3), "tok_per_s": int((tokens - tok_log) / (now - t_log)),
                   "retr_value_acc": racc}
            curve.append(rec)
            print(json.dumps(rec), flush=True)
            acc_loss.zero_()
            acc_n = 0
            t_log, tok_log = now, tokens
    train_sec = time.time() - t0
    print(f"trained {step} steps, {tokens} tokens in {train_sec:.1f}s", flush=True)

    from export import export
    mdir = os.path.join(a.out, "model")
    model.eval()
    check = export(model, mdir, a.kind)
    del fwd, opt
    torch.cuda.empty_cache()
    from evaluate import evaluate
    ev = evaluate(a.kind, mdir, a.data, a.eval_limit)
    print(json.dumps(ev, indent=1, ensure_ascii=False), flush=True)
    from fixtures import ar_fixtures, dlm_fixtures
    (ar_fixtures if is_ar else dlm_fixtures)(mdir, a.data, os.path.join(a.out, "fixtures"))
    summary = {
        "kind": a.kind, "args": vars(a), "cfg": cfg.__dict__, "params": npar,
        "steps": step, "tokens_seen": tokens, "train_seconds": round(train_sec, 1),
        "final_train_loss": curve[-1]["loss"] if curve else None,
        "corpus": stats, "hf_check": check, "eval": ev, "curve": curve,
        "torch": torch.__version__, "device": torch.cuda.get_device_name(),
        "total_seconds": round(time.time() - T_PROCESS, 1),
    }
    try:
        import transformers
        summary["transformers"] = transformers.__version__
    except Exception:
        pass
    json.dump(summary, open(os.path.join(a.out, "summary.json"), "w"), indent=1, ensure_ascii=False)
    print(f"done in {time.time() - T_PROCESS:.1f}s", flush=True)


def _retrieval_probe(logits, x_np, spans, is_ar):
    """Fraction of final-query value bytes predicted right (teacher-forced argmax)."""
    hits = n = 0
    for r, s in enumerate(spans):
        if s is None:
            continue
        a, b = s
        tgt = torch.from_numpy(x_np[r, a:b]).to(logits.device)
        lg = logits[r, a - 1:b - 1] if is_ar else logits[r, a:b]
        hits += int((lg.argmax(-1) == tgt).sum())
        n += b - a
    return round(hits / n, 3) if n else None


if __name__ == "__main__":
    main()
