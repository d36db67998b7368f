#!/usr/bin/env bash
# Stop the qvjax run that launch/tpu_pod.sh started, then delete the TPU.
#
# Usage: launch/tpu_delete.sh --name=NAME --zone=ZONE [options]
#   launch/tpu_delete.sh --name=qv --zone=us-central2-b             # stop, then delete
#   launch/tpu_delete.sh --name=qv --zone=us-central2-b --stop-only # keep the TPU
# Stopping sends SIGTERM to qvjax.main on every worker: the hosts agree on a
# step, save a checkpoint there and exit 0 (the preemption path); running
# launch/tpu_pod.sh again resumes from it. Deleting removes the queued resource
# and its TPU VMs (gcloud asks to confirm unless --yes).
# Options (environment variable in brackets):
#   --name=NAME         TPU VM name, as given to tpu_pod.sh [TPU_NAME]
#   --zone=ZONE         [TPU_ZONE]
#   --project=PROJECT   default: gcloud's core/project [TPU_PROJECT]
#   --qr=ID             queued resource id, default NAME [TPU_QR]
#   --slices=N          as given to tpu_pod.sh [TPU_SLICES]
#   --no-queue          the TPU VM was made by `tpu-vm create`: delete the VM [TPU_NO_QUEUE=1]
#   --stop-only         stop the run, keep the TPU
#   --no-stop           delete without stopping (nothing is saved)
#   --grace=SECONDS     how long to wait for the save, default 600 [QVJAX_STOP_GRACE]
#   --yes               do not ask before deleting
#   --dry-run           print every command, run none [DRY_RUN=1]
set -euo pipefail
usage() { sed -n '2,/^#   --dry-run/p' "$0" | sed 's/^# \{0,1\}//'; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=launch/tpu_common.sh
source "$ROOT/launch/tpu_common.sh"

tpu_defaults
STOP=1 DELETE=1 YES=0
GRACE=${QVJAX_STOP_GRACE:-600}
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --stop-only) DELETE=0 ;;
    --no-stop) STOP=0 ;;
    --grace=*) GRACE=${1#*=} ;;
    --yes) YES=1 ;;
    *) tpu_option "$1" || die_usage "unknown option $1" ;;
  esac
  shift
done
tpu_check
((STOP || DELETE)) || die_usage '--stop-only and --no-stop together do nothing'
[[ $GRACE =~ ^[0-9]+$ ]] || die_usage "--grace=$GRACE is invalid: must be a number of seconds"

if ((STOP)); then
  stop="if [ -s $RUN_PID ] && kill -0 \"\$(cat $RUN_PID)\" 2>/dev/null; then"
  stop+=" pid=\$(cat $RUN_PID); kill -TERM \"\$pid\"; echo \"\$(hostname): SIGTERM sent to qvjax (pid \$pid), waiting for its checkpoint\";"
  stop+=" for i in \$(seq $GRACE); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done;"
  stop+=" if kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): qvjax still running after ${GRACE} s\" >&2; exit 1; fi;"
  stop+=" echo \"\$(hostname): qvjax exited with code \$(cat $RUN_RC 2>/dev/null || echo '?')\";"
  stop+=" else echo \"\$(hostname): no qvjax run\"; fi"
  if ! on_workers "$stop"; then
    echo "error: the run did not stop on every worker (see above); not deleting." \
      "Delete anyway (unsaved steps are lost) with --no-stop" >&2
    exit 1
  fi
fi

if ((DELETE)); then
  confirm=()
  ((YES)) && confirm=(--quiet)
  if ((NO_QUEUE)); then
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" ${confirm[@]+"${confirm[@]}"}
  else
    note "--force: delete the TPU VMs of the queued resource too"
    run gcloud compute tpus queued-resources delete "$QR" "${LOC[@]}" --force ${confirm[@]+"${confirm[@]}"}
  fi
fi
