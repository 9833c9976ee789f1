"""Probe helper: which SDPA backend is fastest for the training shapes (fwd+bwd, bf16)."""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(B, T, H, D, causal, backend):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    try:
        with sdpa_kernel([backend]):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            torch.cuda.synchronize()
            t = time.time()
            n = 10
            for _ in range(n):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            torch.cuda.synchronize()
            dt = (time.time() - t) / n
    except Exception as e:  # noqa: BLE001
        return f"fail {type(e).__name__}"
    fl = 4 * B * H * T * T * D * (0.5 if causal else 1.0) * 3.5  # fwd + bwd(2.5x)
    return f"{dt * 1e3:.2f} ms  {fl / dt / 1e12:.0f} TFLOP/s"


if __name__ == "__main__":
    for (B, T, causal) in [(16, 8192, True), (64, 2048, True), (64, 2048, False)]:
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            print(f"B={B} T={T} causal={causal} {be.name}: {bench(B, T, 6, 64, causal, be)}", flush=True)
