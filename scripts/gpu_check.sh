#!/usr/bin/env bash
# Short end-to-end GPU check, for a machine with CUDA: a zoo search on cuda (one
# Ray actor holding the zoo on the GPU in bfloat16) and a one-shot merge with the
# arithmetic on cuda, compared with the same merge on the CPU.
# Usage: scripts/gpu_check.sh [OUT_DIR]      (expects `make venv` done, or a venv at .venv)
# OUT_DIR must be new or empty (nothing in it is ever deleted); default: a fresh
# directory from mktemp.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d -t evomerge-gpu-check.XXXXXX)}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu_check: $OUT is not empty; give a new or empty directory" >&2
  exit 2
fi
mkdir -p "$OUT"
echo "gpu_check: writing to $OUT"
PY=${PY:-.venv/bin/python}
EVO=${EVO:-.venv/bin/evomerge}
export RAY_AUTH_MODE=disabled
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(0))"
# 1. the demo zoo (built on the CPU if missing) searched on cuda
cat > "$OUT/gpu.yaml" <<YAML
name: gpu-check
models: [zoo:add, zoo:rev, zoo:sort]
base_model: zoo:base
merge: {method: ties, parameters: {weight: {low: 0.0, high: 1.5}, density: {low: 0.3, high: 1.0}}}
fitness: {tasks: [add, rev, sort], samples: 300}
search: {sampler: cmaes, seed: 0, trials: 24}
workers: 1
device: cuda
YAML
$EVO run "$OUT/gpu.yaml" --out "$OUT/run" --quiet
$PY - "$OUT/run/summary.json" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({k: s[k] for k in ("best_fitness", "best_test_fitness", "trials", "worker_busy_fraction", "wall_seconds")}))
assert s["trials"]["complete"] == 24, s["trials"]
PYEOF
# 2. a one-shot merge on cuda equals the CPU merge to rounding
$EVO merge "$OUT/run/best_recipe.yml" "$OUT/merged-cuda" --device cuda --quiet
$EVO merge "$OUT/run/best_recipe.yml" "$OUT/merged-cpu" --device cpu --quiet
$PY - "$OUT" <<'PYEOF'
import sys, torch
from safetensors.torch import load_file
a = load_file(f"{sys.argv[1]}/merged-cuda/model.safetensors")
b = load_file(f"{sys.argv[1]}/merged-cpu/model.safetensors")
worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
print(f"cuda vs cpu merge: max abs difference {worst:.2e}")
assert worst < 1e-4
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(f"{sys.argv[1]}/merged-cuda").to("cuda")
print("GPU CHECK PASSED")
PYEOF
