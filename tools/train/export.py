"""Export a trained LlamaLM to a Hugging Face directory and check it against transformers.

AR: ``LlamaForCausalLM.save_pretrained`` (bf16, sharded so every file is <= 16 MiB).
DLM: the same tensors/config, then config.json is rewritten with
``architectures: ["LlamaForMaskedDiffusion"]``, ``is_causal: false``, ``mask_token_id``.
"""
from __future__ import annotations

import json
import os

import torch

from data import BOS, EOS, MASK, PAD, TOKENIZER_JSON
from model import Cfg, LlamaLM

MAX_SHARD = "15MB"  # 15e6 bytes < 16 MiB


def hf_config(cfg: Cfg):
    from transformers import LlamaConfig
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        initializer_range=0.02,
    )
    try:  # transformers v5
        c = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    except TypeError:  # v4
        c = LlamaConfig(**common, rope_theta=cfg.rope_theta)
    return c


def load_hf_causal(path: str, dtype=torch.float32, device="cpu", **overrides):
    from transformers import LlamaForCausalLM
    try:
        m = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **overrides)
    except TypeError:
        m = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation="eager", **overrides)
    return m.to(device).eval()


@torch.no_grad()
def export(model: LlamaLM, out_dir: str, kind: str, extra_card: dict | None = None) -> dict:
    """Save ``model`` (its weights rounded to bf16) to ``out_dir``; return check results."""
    from transformers import LlamaForCausalLM
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.cfg
    hcfg = hf_config(cfg)
    hf = LlamaForCausalLM(hcfg)
    sd = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    hf = hf.to(torch.bfloat16)
    hf.config.use_cache = True
    hf.save_pretrained(out_dir, max_shard_size=MAX_SHARD, safe_serialization=True)
    cpath = os.path.join(out_dir, "config.json")
    conf = json.load(open(cpath))
    if kind == "dlm":
        conf["architectures"] = ["LlamaForMaskedDiffusion"]
        conf["is_causal"] = False
        conf["mask_token_id"] = MASK
        conf["max_position_embeddings"] = cfg.max_position_embeddings
    json.dump(conf, open(cpath, "w"), indent=2, sort_keys=True)
    json.dump(TOKENIZER_JSON, open(os.path.join(out_dir, "prehoc_tokenizer.json"), "w"), indent=2)
    for f in sorted(os.listdir(out_dir)):
        sz = os.path.getsize(os.path.join(out_dir, f))
        assert sz <= 16 * 2**20, (f, sz)
        print(f"  export {f}: {sz} bytes", flush=True)
    return check_against_hf(model, out_dir)


@torch.no_grad()
def check_against_hf(model: LlamaLM, out_dir: str) -> dict:
    """transformers' LlamaForCausalLM (fp32, loaded from out_dir) vs our forward in fp32
    with the same bf16-rounded weights, on a random byte batch, with our causal and our
    bidirectional attention.  For the AR model HF must match our causal forward.  For the
    DLM directory (config ``is_causal: false``) we record which one HF reproduces."""
    hf = load_hf_causal(out_dir, torch.float32, "cuda")
    sd = {k: v.float() for k, v in load_safetensors_dir(out_dir).items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 300), generator=g)
    ids[:, 0] = BOS
    ids = ids.cuda()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    a = hf(input_ids=ids).logits.float()
    res = {}
    for name, causal in (("causal", True), ("bidirectional", False)):
        ref = LlamaLM(Cfg(**{**model.cfg.__dict__, "causal": causal})).cuda().eval()
        ref.load_state_dict(sd)
        b = ref(ids).float()
        res[f"hf_vs_ours_{name}_fp32_max_abs_diff"] = (a - b).abs().max().item()
        res[f"hf_vs_ours_{name}_fp32_rel_l2"] = ((a - b).norm() / a.norm()).item()
    torch.backends.cuda.matmul.allow_tf32 = prev
    res["hf_matches"] = [n for n in ("causal", "bidirectional") if res[f"hf_vs_ours_{n}_fp32_rel_l2"] < 1e-4]
    print("  hf check:", res, flush=True)
    if model.cfg.causal:
        assert "causal" in res["hf_matches"], res
    else:  # also load with is_causal forced on: must equal our causal forward (names, layout)
        try:
            hf2 = load_hf_causal(out_dir, torch.float32, "cuda", is_causal=True)
            ref = LlamaLM(Cfg(**{**model.cfg.__dict__, "causal": True})).cuda().eval()
            ref.load_state_dict(sd)
            torch.backends.cuda.matmul.allow_tf32 = False
            a2, b2 = hf2(input_ids=ids).logits.float(), ref(ids).float()
            torch.backends.cuda.matmul.allow_tf32 = prev
            res["hf_is_causal_override_vs_ours_causal_rel_l2"] = ((a2 - b2).norm() / a2.norm()).item()
        except Exception as e:  # noqa: BLE001
            res["hf_is_causal_override_error"] = repr(e)
        print("  hf check (dlm):", res, flush=True)
    return res


def load_safetensors_dir(d: str) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(d, f)))
    return sd


def load_ours(d: str, causal: bool, device="cuda") -> LlamaLM:
    """Our module from an exported directory (bf16 weights upcast to fp32)."""
    conf = json.load(open(os.path.join(d, "config.json")))
    rp = conf.get("rope_parameters") or {}
    theta = rp.get("rope_theta", conf.get("rope_theta", 10000.0))
    cfg = Cfg(vocab_size=conf["vocab_size"], hidden_size=conf["hidden_size"],
              intermediate_size=conf["intermediate_size"], num_hidden_layers=conf["num_hidden_layers"],
              num_attention_heads=conf["num_attention_heads"],
              num_key_value_heads=conf["num_key_value_heads"], head_dim=conf["head_dim"],
              rope_theta=float(theta), rms_norm_eps=conf["rms_norm_eps"],
              max_position_embeddings=conf["max_position_embeddings"], causal=causal)
    m = LlamaLM(cfg).to(device)
    m.load_state_dict({k: v.float() for k, v in load_safetensors_dir(d).items()})
    return m.eval()
