#!/usr/bin/env bash
# Rehearse a multi-host run on one machine: N processes on 127.0.0.1 joined by
# JAX's distributed runtime, the CPU devices split between them.
#
# Usage: launch/local.sh N [qvjax.main flags...]
#   launch/local.sh 2 --config=configs/qv_small.py
#   QVJAX_DEVICES=8 launch/local.sh 2 --config=configs/tiny.py --config.mesh.data=2 --config.mesh.fsdp=4
# Environment: QVJAX_DEVICES (total fake CPU devices, default N), QVJAX_PORT
# (coordinator port, default a free one), PYTHON (default python).
# Process 0's output is shown as is; the others' lines carry "[i]".
# SIGTERM/SIGINT to this script reach every process (a preemption rehearsal).
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
N=$1
shift
DEVICES=${QVJAX_DEVICES:-$N}
if (( DEVICES % N )); then
  echo "error: QVJAX_DEVICES=$DEVICES is invalid: must be a multiple of N=$N" >&2
  exit 2
fi
PY=${PYTHON:-python}
PORT=${QVJAX_PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < N; i++)); do
  env XLA_FLAGS="--xla_force_host_platform_device_count=$((DEVICES / N))" JAX_PLATFORMS=cpu \
    $PY -m qvjax.main "$@" --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$N" --process_id="$i" \
    > >(trap '' INT TERM  # The log filters outlive a Ctrl-C: no broken pipes.
        if ((i == 0)); then exec cat; else exec sed -u "s/^/[$i] /"; fi) 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for pid in "${pids[@]}"; do
  # A trapped signal interrupts `wait`; keep waiting for the real exit code.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  wait "$pid" || status=$?
done
exit $status
