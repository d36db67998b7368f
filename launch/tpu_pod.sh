#!/usr/bin/env bash
# Train on a Cloud TPU VM (one slice or several) with the same
# `python -m qvjax.main ...` on every worker, and stream process 0's log.
#
# Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE [options] [--] QVJAX_MAIN_FLAGS...
#   launch/tpu_pod.sh --name=qv --zone=us-central2-b --type=v4-32 -- \
#     --config=configs/qv_small.py --workdir=gs://BUCKET/runs/qv \
#     --config.dataset.data_dir=gs://BUCKET/tfds
# Steps: 1. create the queued resource NAME (or reuse it) and wait until ACTIVE;
# 2. copy this checkout (or clone --repo) to ~/qvjax on every worker and install
# it, with gcsfs and `jax[tpu]`, in ~/qvjax/.venv; 3. start qvjax.main on every
# worker in the background (it survives a lost connection); 4. stream process
# 0's log until the run ends and exit with its exit code (Ctrl-C stops the
# stream, not the run).
# Options (environment variable in brackets):
#   --name=NAME         TPU VM name; also the queued resource's [TPU_NAME]
#   --zone=ZONE         e.g. us-central2-b [TPU_ZONE]
#   --project=PROJECT   default: gcloud's core/project [TPU_PROJECT]
#   --type=TYPE         accelerator type, e.g. v4-32, v5litepod-16, v6e-16;
#                       needed to create [TPU_TYPE]
#   --runtime=VERSION   TPU software version; default from --type: v6e-*
#                       v2-alpha-tpuv6e, v5p-* v2-alpha-tpuv5, v5litepod-*
#                       v2-alpha-tpuv5-lite, v2/v3/v4-* tpu-ubuntu2204-base [TPU_RUNTIME]
#   --spot              Spot VMs: cheaper, may be preempted [TPU_SPOT=1]
#   --slices=N          N > 1: a multislice queued resource of N slices [TPU_SLICES]
#   --qr=ID             queued resource id, default NAME [TPU_QR]
#   --no-queue          use the existing TPU VM NAME (made by `tpu-vm create`) [TPU_NO_QUEUE=1]
#   --repo=URL          git clone URL on the workers instead of copying this checkout [QVJAX_REPO]
#   --ref=REF           with --repo: what to check out, default origin/HEAD [QVJAX_REF]
#   --python=VERSION    Python of the workers' venv (made by uv), default 3.12 [QVJAX_PYTHON]
#   --pip=REQS          what to install beside qvjax, default 'jax[tpu]' [QVJAX_PIP]
#   --env=KEY=VALUE     environment of qvjax.main on every worker (repeatable)
#   --skip-setup        reuse the code and venv already on the workers
#   --setup-only        create and set up; start nothing
#   --detach            start the run and return; see the log later with --logs
#   --logs              only stream process 0's log of the current or last run
#   --dry-run           print every command, run none [DRY_RUN=1]
# Stop the run, or delete the TPU: launch/tpu_delete.sh. Guide: docs/multihost.md.
set -euo pipefail
usage() { sed -n '2,/^# Stop the run/p' "$0" | sed 's/^# \{0,1\}//'; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/tpu_common.sh
source "$ROOT/launch/tpu_common.sh"

tpu_defaults
TYPE=${TPU_TYPE:-}
RUNTIME=${TPU_RUNTIME:-}
SPOT=${TPU_SPOT:-0}
REPO=${QVJAX_REPO:-}
REF=${QVJAX_REF:-origin/HEAD}
PYVER=${QVJAX_PYTHON:-3.12}
PIP=${QVJAX_PIP:-jax[tpu]}
REMOTE_DIR=qvjax  # Relative to the workers' home directory.
POLL_S=${QVJAX_POLL_S:-30}  # Seconds between checks of the queued resource.
ENVS=()
SETUP=1 START=1 STREAM=1 SETUP_ONLY=0 LOGS_ONLY=0
ARGS=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --type=*) TYPE=${1#*=} ;;
    --runtime=*) RUNTIME=${1#*=} ;;
    --spot) SPOT=1 ;;
    --repo=*) REPO=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --python=*) PYVER=${1#*=} ;;
    --pip=*) PIP=${1#*=} ;;
    --env=*) ENVS+=("${1#*=}") ;;
    --skip-setup) SETUP=0 ;;
    --setup-only) SETUP_ONLY=1 ;;
    --detach) STREAM=0 ;;
    --logs) LOGS_ONLY=1 ;;
    --) shift; ARGS+=("$@"); break ;;
    --config=* | --config.*=* | --workdir=* | --mode=* | --step=* | --distributed_timeout=*)
      ARGS+=("$1") ;;  # qvjax.main's own flags may also come before --.
    *) tpu_option "$1" || die_usage "unknown option $1 (qvjax.main flags go after --)" ;;
  esac
  shift
done
tpu_check
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env=$kv is invalid: must be KEY=VALUE"
done
if ((LOGS_ONLY)); then
  SETUP=0 START=0 STREAM=1
elif ((SETUP_ONLY)); then
  START=0 STREAM=0
else
  have_config=0
  for a in ${ARGS[@]+"${ARGS[@]}"}; do [[ $a == --config=* ]] && have_config=1; done
  ((have_config)) || die_usage 'no qvjax.main flags: pass them after --, e.g. -- --config=configs/qv_small.py'
  workdir_gs=0
  for a in ${ARGS[@]+"${ARGS[@]}"}; do [[ $a == --workdir=gs://* ]] && workdir_gs=1; done
  ((workdir_gs)) || echo "warning: no --workdir=gs://...: every worker writes its own disk; a run on" \
    "several hosts needs a workdir all hosts share (a gs:// bucket) for its checkpoints" >&2
fi
if [[ -n $TYPE && -z $RUNTIME ]]; then  # The software versions Cloud TPU documents per type.
  case $TYPE in
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) die_usage "--type=$TYPE has no default runtime: pass --runtime" ;;
  esac
fi

# 1. The TPU: reuse the queued resource, or create it, then wait for ACTIVE.
if ((!NO_QUEUE && !LOGS_ONLY)); then
  describe=(gcloud compute tpus queued-resources describe "$QR" "${LOC[@]}" --format='value(state.state)')
  create=(gcloud compute tpus queued-resources create "$QR" "${LOC[@]}"
          --accelerator-type="$TYPE" --runtime-version="$RUNTIME")
  if ((SLICES > 1)); then
    create+=(--node-count="$SLICES" --node-prefix="$NAME")
  else
    create+=(--node-id="$NAME")
  fi
  ((SPOT)) && create+=(--spot)
  need_create() {
    [[ -n $TYPE ]] || die_usage "queued resource $QR does not exist: --type (or TPU_TYPE) is needed to create it"
  }
  if ((DRY_RUN)); then
    note "reuse the queued resource if it exists:"
    run "${describe[@]}"
    if [[ -n $TYPE ]]; then
      note "else create it:"
      run "${create[@]}"
    else
      note "else create it: needs --type"
    fi
    note "then repeat the describe every $POLL_S s until it prints ACTIVE"
  else
    printf '%s\n' "$(qall "${describe[@]}")"
    errors=$(mktemp)
    if ! state=$("${describe[@]}" 2>"$errors"); then
      if grep -qi 'not.found' "$errors"; then
        rm -f "$errors"
        need_create
        run "${create[@]}"
        state=
      else
        cat "$errors" >&2
        rm -f "$errors"
        echo "error: could not describe queued resource $QR (see above)" >&2
        exit 1
      fi
    fi
    rm -f "$errors"
    while [[ $state != ACTIVE ]]; do
      case $state in
        FAILED | SUSPENDING | SUSPENDED)
          echo "error: queued resource $QR is $state (a Spot TPU may have been preempted):" \
            "delete it with launch/tpu_delete.sh --name=$NAME --zone=$ZONE and run this again" >&2
          exit 1 ;;
      esac
      echo "queued resource $QR: ${state:-requested}; checking again in $POLL_S s"
      sleep "$POLL_S"
      state=$("${describe[@]}")
    done
    echo "queued resource $QR: ACTIVE"
  fi
fi

# 2. Code and environment on every worker.
if ((SETUP)); then
  if [[ -n $REPO ]]; then
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet --tags origin;"
    fetch+=" else git clone --quiet $(q "$REPO") $REMOTE_DIR; fi"
    fetch+=" && git -C $REMOTE_DIR checkout --quiet --detach $(q "$REF")"
  else
    TARBALL=${TMPDIR:-/tmp}/qvjax-src-$NAME.tar.gz
    note "pack this checkout (tracked and untracked files, .gitignore respected):"
    printf '%s\n' "git -C $(q "$ROOT") ls-files -z --cached --others --exclude-standard | tar -czf $(q "$TARBALL") -C $(q "$ROOT") --null -T -"
    if ((!DRY_RUN)); then  # (Files deleted but not yet committed are left out.)
      git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ -e $ROOT/$f ]] && printf '%s\0' "$f"; done |
        tar -czf "$TARBALL" -C "$ROOT" --null -T -
    fi
    if ((SLICES > 1)); then
      run gcloud compute tpus queued-resources scp "$TARBALL" "$QR:qvjax-src.tar.gz" "${LOC[@]}" \
        --node=all --worker=all
    else
      run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:qvjax-src.tar.gz" "${LOC[@]}" --worker=all
    fi
    ((DRY_RUN)) || rm -f "$TARBALL"
    fetch="mkdir -p $REMOTE_DIR && tar -xzf qvjax-src.tar.gz -C $REMOTE_DIR && rm qvjax-src.tar.gz"
  fi
  read -r -a pip_reqs <<<"$PIP"
  # shellcheck disable=SC2016  # Expanded on the worker.
  uv='"$HOME"/.local/bin/uv'
  install="python3 -m pip install --user --quiet --upgrade uv"
  install+=" && $uv venv --allow-existing --python $(q "$PYVER") .venv"
  install+=" && $uv pip install --quiet --python .venv/bin/python -e '.[gcs]' $(qall ${pip_reqs[@]+"${pip_reqs[@]}"})"
  on_workers "set -e; $fetch; cd $REMOTE_DIR && $install"
fi

# 3. The same command on every worker, detached from the ssh session.
if ((START)); then
  cmd=(.venv/bin/python -m qvjax.main ${ARGS[@]+"${ARGS[@]}"})
  ((${#ENVS[@]} == 0)) || cmd=(env "${ENVS[@]}" "${cmd[@]}")
  job="$(qall "${cmd[@]}") & echo \$! > $RUN_PID; wait \$!; echo \$? > $RUN_RC"
  start="cd $REMOTE_DIR || exit 1"
  start+="; if [ -f $RUN_PID ] && kill -0 \"\$(cat $RUN_PID)\" 2>/dev/null; then"
  start+=" echo \"error: qvjax is already running on \$(hostname): stop it with launch/tpu_delete.sh --stop-only\" >&2; exit 1; fi"
  start+="; rm -f $RUN_PID $RUN_RC"
  start+="; nohup setsid bash -c $(q "$job") > $RUN_LOG 2>&1 < /dev/null &"
  on_workers "$start"
fi

# 4. Process 0's log, until its run ends; the exit code is the run's.
if ((STREAM)); then
  logs="for i in \$(seq 60); do [ -s $RUN_PID ] && break; sleep 1; done"
  logs+="; [ -s $RUN_PID ] || { echo \"error: no qvjax run on \$(hostname)\" >&2; exit 1; }"
  logs+="; tail -n +1 -F --pid=\"\$(cat $RUN_PID)\" $RUN_LOG 2>/dev/null"
  logs+="; for i in \$(seq 30); do [ -s $RUN_RC ] && break; sleep 1; done"
  logs+="; rc=\$(cat $RUN_RC 2>/dev/null || echo 1); echo \"qvjax exited with code \$rc\"; exit \"\$rc\""
  on_workers "$logs" 0
fi
