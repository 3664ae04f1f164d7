#!/usr/bin/env bash
# Short end-to-end GPU check, for a machine with CUDA:
#   1. a demo-zoo search on cuda (one Ray actor holding the zoo on the GPU in bfloat16),
#      its export, and `evomerge eval` of the export on cuda against the recorded fitness;
#   2. a one-shot merge with the arithmetic on cuda, compared with the same merge on the CPU;
#   3. a ~1B-parameter Llama (random weights from a config) searched under placement
#      resident and streamed (bench/gpu_search.py): merge and scoring seconds per trial,
#      the worker's peak GPU memory against the plan, equal trial values, eval of the export;
#   4. bench/candidate_cost.py on cuda: merge seconds against a plain weighted add, and
#      host-to-device bytes per candidate, for both placements.
# Every figure is also written to OUT_DIR/figures.txt.
# Usage: scripts/gpu_check.sh [OUT_DIR]      (expects `make venv` done, or a venv at .venv;
#        ZOO=DIR uses a demo zoo already built, else it is built here)
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
ZOO=${ZOO:-$($PY -c "from evomerge.fitness.presets import ensure_preset; print(ensure_preset('demo', log=lambda _: None))")}
# 1. the demo zoo searched on cuda; the export's eval reproduces the recorded test fitness
cat > "$OUT/gpu.yaml" <<YAML
name: gpu-check
zoo: $ZOO
models: [zoo:add, zoo:rev, zoo:sort]
base_model: zoo:base
merge: {method: ties, parameters: {weight: {low: 0.0, high: 1.5}, density: {low: 0.3, high: 1.0}}}
fitness: {tasks: [add, rev, sort], samples: 300}
search: {sampler: cmaes, seed: 0, trials: 24}
workers: 1
device: cuda
YAML
export MLFLOW_TRACKING_URI="sqlite:///$OUT/mlflow.db"
$EVO run "$OUT/gpu.yaml" --out "$OUT/run" --quiet
$EVO export "$OUT/run" "$OUT/export" --no-register > /dev/null
$EVO eval "$OUT/export" --config "$OUT/gpu.yaml" --split test | tail -1 > "$OUT/eval.json"
$PY - "$OUT" <<'PYEOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/run/summary.json"))
e = json.load(open(f"{sys.argv[1]}/eval.json"))
keys = ("best_fitness", "best_test_fitness", "trials", "worker_busy_fraction", "wall_seconds", "memory")
figures = {"check": "demo zoo search", **{k: s[k] for k in keys}, "eval_of_export": e["fitness"]}
figures["eval_reproduces"] = e["fitness"] == s["best_test_fitness"]
print(json.dumps(figures))
open(f"{sys.argv[1]}/figures.txt", "a").write(json.dumps(figures) + "\n")
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
PYEOF
# 3. the ~1B model under both placements, end to end
$PY bench/gpu_search.py --device cuda --zoo "$ZOO" --work "$OUT/large" | tee -a "$OUT/figures.txt"
# 4. what a candidate merge costs on the GPU, per placement
$PY bench/candidate_cost.py --device cuda --zoo "$ZOO" --methods linear,task_arithmetic,ties | tee -a "$OUT/figures.txt"
echo "GPU CHECK PASSED (figures: $OUT/figures.txt)"
