#!/usr/bin/env bash
# GPU benchmark: the configs/scale ~125M and ~350M presets in bfloat16 on one
# GPU, for qkv, gqa, qv and mla: train step (tokens/s, MFU against the chip's
# published bf16 peak, memory_analysis) and decode (ms per token), written as
# JSON and one Markdown table (docs/performance.md explains the columns).
#
# Usage: launch/gpu_bench.sh [OUT_DIR]          (default runs/gpu_bench)
# Environment:
#   SIZES="125m 350m"  PARADIGMS="qkv gqa qv mla"   what to run
#   PYTHON=python3     the interpreter (the one whose JAX sees the GPU)
#   QVJAX_WHEELS=DIR   install missing wheels from DIR only (machines with no network)
#   STEP_TIMEOUT=420   seconds per config before it is abandoned (recorded as failed)
# It uses the interpreter's JAX if that already runs on a GPU; otherwise it
# installs jax[cuda12] (from QVJAX_WHEELS when set). qvjax's own pure-Python
# needs (ml_collections, absl) are installed without dependencies, so an
# image's JAX/Flax are left as they are. Configs that fail (e.g. out of
# memory) are recorded and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_bench}
SIZES=${SIZES:-125m 350m}
PARADIGMS=${PARADIGMS:-qkv gqa qv mla}
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
mkdir -p "$OUT"
PIP_SOURCE=()
if [[ -n "${QVJAX_WHEELS:-}" ]]; then PIP_SOURCE=(--no-index --find-links "$QVJAX_WHEELS"); fi

on_gpu() { $PY -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; }
if ! on_gpu; then
  echo "JAX does not see a GPU: installing jax[cuda12]" >&2
  $PY -m pip install -q -U "${PIP_SOURCE[@]}" "jax[cuda12]" || { echo "error: could not install CUDA JAX" >&2; exit 1; }
  on_gpu || { echo "error: JAX still sees no GPU" >&2; exit 1; }
fi
for module in ml_collections absl; do
  $PY -c "import $module" 2>/dev/null || $PY -m pip install -q --no-deps "${PIP_SOURCE[@]}" \
    "$( [[ $module == absl ]] && echo absl-py || echo ml_collections )" || exit 1
done
$PY - <<'EOF' | tee "$OUT/machine.txt"
import jax, flax, platform
d = jax.devices()[0]
print(f'{jax.device_count()} x {d.device_kind} | jax {jax.__version__} | flax {flax.__version__} | '
      f'python {platform.python_version()}')
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader \
  >> "$OUT/machine.txt" 2>/dev/null || true

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
for size in $SIZES; do
  for paradigm in $PARADIGMS; do
    # 16 sequences of 2048 tokens per step at 125m, 8 at 350m; MLA keeps its
    # (H, T, T) scores (no flash kernel for it), so it remats at 350m.
    batch=16; remat=none
    if [[ $size == 350m ]]; then batch=8; [[ $paradigm == mla ]] && remat=full; fi
    name="${size}_${paradigm}"
    echo "=== $name (batch $batch x 2048, remat $remat)"
    timeout "$STEP_TIMEOUT" $PY -m qvjax.bench --configs="configs/scale/$size.py:$paradigm" \
      --what=all --set=global_batch_size=$batch --set=mesh.data=-1 --set=remat=$remat \
      --steps=5 --warmup=2 --contexts=1024,4096 --batches=1,8 --decode_steps=8 \
      --json="$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | grep -v -i warning
    status=${PIPESTATUS[0]}
    if (( status != 0 )); then
      echo "$name failed (exit $status): see $OUT/$name.log" | tee -a "$OUT/failed.txt"
    fi
  done
done
$PY - "$OUT" <<'EOF'
import glob, json, os, sys
from qvjax import bench
out = sys.argv[1]
results = []
for path in sorted(glob.glob(os.path.join(out, '*.json'))):
  results += json.load(open(path))
table = bench.markdown(results)
with open(os.path.join(out, 'table.md'), 'w') as f:
  f.write(open(os.path.join(out, 'machine.txt')).read() + '\n' + table)
print(table)
EOF
