#!/usr/bin/env bash
# Probe + smoke test on the GPU machine (run from the repo root; $OUT set by the device tool).
# Prints versions and Python roots, generates tests/data, benches SDPA backends, and runs
# a short end-to-end AR and DLM training (train -> export -> HF check -> eval -> fixtures).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L=$OUT/probe.log
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  which python3; python3 --version
  python3 -c "import torch, transformers, safetensors, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'safetensors', safetensors.__version__, 'numpy', numpy.__version__)"
  python3 -c "import sysconfig, site, sys; print(sys.prefix, sys.base_prefix); print(sysconfig.get_paths()); print(site.getsitepackages())"
  nproc; free -g | head -2
  time timeout 150 python3 tools/train/make_evalsets.py --out tests/data
  du -sh tests/data; ls -la tests/data
  timeout 60 python3 tools/train/bench_attn.py
  timeout 170 python3 tools/train/train.py --kind ar --out /tmp/smoke_ar --train-seconds 70 --short-frac 0.4 --eval-limit 4 --log-every 10
  timeout 110 python3 tools/train/train.py --kind dlm --out /tmp/smoke_dlm --train-seconds 35 --eval-limit 4 --log-every 10
  ls -la /tmp/smoke_ar/model /tmp/smoke_dlm/model
  cat /tmp/smoke_ar/model/config.json /tmp/smoke_dlm/model/config.json
} 2>&1 | tee "$L"
tar -czf "$OUT/probe.tgz" tests/data /tmp/smoke_ar/summary.json /tmp/smoke_dlm/summary.json \
  /tmp/smoke_ar/fixtures /tmp/smoke_dlm/fixtures /tmp/smoke_ar/model/config.json /tmp/smoke_dlm/model/config.json \
  /tmp/smoke_ar/model/*.json 2>/dev/null
ls -la "$OUT"
