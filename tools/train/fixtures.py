"""Golden fixtures for the shipped models (float32, CPU, no TF32).

AR  (transformers' own LlamaForCausalLM, loaded from the model directory, eager attention):
    for each prompt i: p{i}.prefill [T,260] = logits of the prompt forward;
    greedy_tokens[0] = argmax(prefill[-1]); p{i}.decode [8,260], row j = logits of the
    forward (with the KV cache) that consumed greedy_tokens[j]; greedy_tokens[j+1] =
    argmax(decode[j]).
DLM (our reference forward, bidirectional, tools/train/model.py): p{i}.full [T,260] on
    prompts that contain MASK (259) tokens.

Usage: python fixtures.py --kind ar|dlm --model DIR --data tests/data --out DIR
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from data import MASK, encode
from evaluate import read_jsonl

N_DECODE = 8


def _prompts(data_dir, lengths):
    """Held-out prompts: the start of ppl_2k rows, cut to len-1 bytes (+BOS = len)."""
    rows = read_jsonl(os.path.join(data_dir, "ppl_2k.jsonl"))
    out = []
    for i, L in enumerate(lengths):
        b = rows[i]["text"].encode()[:L - 1]
        while True:  # keep whole utf-8 characters
            try:
                b.decode("utf-8")
                break
            except UnicodeDecodeError:
                b = b[:-1]
        out.append(encode(b.decode("utf-8")))
    return out


@torch.no_grad()
def ar_fixtures(model_dir, data_dir, out_dir):
    from safetensors.torch import save_file
    from export import load_hf_causal
    torch.backends.cuda.matmul.allow_tf32 = False
    m = load_hf_causal(model_dir, torch.float32, "cpu")
    tensors, prompts = {}, []
    for i, ids in enumerate(_prompts(data_dir, [16, 40, 64])):
        x = torch.tensor([ids])
        out = m(input_ids=x, use_cache=True)
        tensors[f"p{i}.prefill"] = out.logits[0].float().contiguous()
        past = out.past_key_values
        tok = int(out.logits[0, -1].argmax())
        greedy, rows = [], []
        for _ in range(N_DECODE):
            greedy.append(tok)
            o = m(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = o.past_key_values
            rows.append(o.logits[0, -1].float())
            tok = int(o.logits[0, -1].argmax())
        tensors[f"p{i}.decode"] = torch.stack(rows).contiguous()
        # cross-check: the cached decode equals a full forward over prompt+greedy
        full = m(input_ids=torch.tensor([ids + greedy])).logits[0, len(ids):].float()
        dmax = (full - tensors[f"p{i}.decode"]).abs().max().item()
        prompts.append({"input_ids": ids, "greedy_tokens": greedy,
                        "prefill": f"p{i}.prefill", "decode": f"p{i}.decode",
                        "cache_vs_full_max_abs_diff": dmax})
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"))
    meta = {
        "model": "models/prehoc-code-ar",
        "producer": "transformers LlamaForCausalLM.from_pretrained(dtype=float32, attn_implementation='eager'), CPU, KV cache",
        "dtype": "float32 (bf16 weights upcast)",
        "tokenizer": "byte: ids 0..255 bytes, 256 BOS (first token of every prompt)",
        "layout": "p{i}.prefill [T,260]: logits of the prompt forward; greedy_tokens[0]=argmax(prefill[-1]); "
                  "p{i}.decode [8,260]: row j = logits of the forward that consumed greedy_tokens[j]; "
                  "greedy_tokens[j+1]=argmax(decode[j])",
        "prompts": prompts,
    }
    json.dump(meta, open(os.path.join(out_dir, "expected.json"), "w"), indent=1)
    print("ar fixtures:", [(len(p["input_ids"]), p["greedy_tokens"], p["cache_vs_full_max_abs_diff"]) for p in prompts])


@torch.no_grad()
def dlm_fixtures(model_dir, data_dir, out_dir):
    from safetensors.torch import save_file
    from export import load_ours
    m = load_ours(model_dir, causal=False, device="cpu")
    tensors, prompts = {}, []
    for i, ids in enumerate(_prompts(data_dir, [32, 64])):
        ids = list(ids)
        T = len(ids)
        masked = sorted(set([T // 3, T // 3 + 1, T // 2] + list(range(T - 8, T))))
        for j in masked:
            ids[j] = MASK
        tensors[f"p{i}.full"] = m(torch.tensor([ids]))[0].float().contiguous()
        prompts.append({"input_ids": ids, "mask_positions": masked, "full": f"p{i}.full",
                        "argmax_at_masks": [int(tensors[f"p{i}.full"][j].argmax()) for j in masked]})
    hf_note = None
    try:  # does transformers (config is_causal=false) reproduce the bidirectional forward?
        from export import load_hf_causal
        hf = load_hf_causal(model_dir, torch.float32, "cpu")
        hf_note = {f"p{i}.full": (hf(input_ids=torch.tensor([p["input_ids"]])).logits[0].float()
                                  - tensors[f"p{i}.full"]).abs().max().item() for i, p in enumerate(prompts)}
    except Exception as e:  # noqa: BLE001
        hf_note = repr(e)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "expected.safetensors"))
    meta = {
        "model": "models/prehoc-code-dlm",
        "transformers_LlamaForCausalLM_same_dir_max_abs_diff": hf_note,
        "producer": "tools/train/model.py LlamaLM(causal=False) float32 on CPU (bf16 weights upcast)",
        "dtype": "float32",
        "tokenizer": "byte: ids 0..255 bytes, 256 BOS, 259 MASK",
        "layout": "p{i}.full [T,260]: logits of one bidirectional forward over input_ids (no causal mask)",
        "prompts": prompts,
    }
    json.dump(meta, open(os.path.join(out_dir, "expected.json"), "w"), indent=1)
    print("dlm fixtures:", [(len(p["input_ids"]), p["argmax_at_masks"]) for p in prompts])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True, choices=["ar", "dlm"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="tests/data")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    (ar_fixtures if a.kind == "ar" else dlm_fixtures)(a.model, a.data, a.out)
