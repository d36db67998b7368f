# shellcheck shell=bash disable=SC2016,SC2034  # Remote shell text; used by the sourcing scripts.
# Shared by launch/tpu_pod.sh and launch/tpu_delete.sh (sourced, not run).
# The gcloud command lines follow the Google Cloud SDK reference of
# `gcloud compute tpus queued-resources {create,describe,delete,ssh,scp}` and
# `gcloud compute tpus tpu-vm {ssh,scp,delete}`; see docs/multihost.md.

# Files each worker keeps in its home directory for the current run.
RUN_LOG='"$HOME"/qvjax-run.log'  # Everything the worker's qvjax.main prints.
RUN_PID='"$HOME"/qvjax-run.pid'  # Its process id (while it runs).
RUN_RC='"$HOME"/qvjax-run.rc'    # Its exit code (once it has ended).

die_usage() {  # Print the message and the usage block, exit 2.
  echo "error: $*" >&2
  usage >&2
  exit 2
}

# q WORD: WORD quoted for a POSIX shell (as is when that is safe).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,^-]+$ ]]; then
    printf '%s' "$1"
  else
    local escaped="'\\''"  # ' -> '\'' inside single quotes.
    printf "'%s'" "${1//\'/$escaped}"
  fi
}

# qall WORDS...: the words quoted and joined by spaces: one shell command.
qall() {
  local out='' w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

# run CMD ARGS...: print the command (quoted, copy-pastable), then run it
# unless this is a dry run.
run() {
  printf '%s\n' "$(qall "$@")"
  ((DRY_RUN)) || "$@"
}

note() { printf '# %s\n' "$*"; }  # Explanations in the printed plan.

# The options both TPU scripts take; each also comes from the environment.
tpu_defaults() {
  NAME=${TPU_NAME:-}
  ZONE=${TPU_ZONE:-}
  PROJECT=${TPU_PROJECT:-}
  QR=${TPU_QR:-}
  SLICES=${TPU_SLICES:-1}
  NO_QUEUE=${TPU_NO_QUEUE:-0}
  DRY_RUN=${DRY_RUN:-0}
}

# tpu_option ARG: consumes one of the shared options; returns 1 if ARG is not one.
tpu_option() {
  case $1 in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --qr=*) QR=${1#*=} ;;
    --slices=*) SLICES=${1#*=} ;;
    --no-queue) NO_QUEUE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

tpu_check() {
  [[ -n $NAME ]] || die_usage '--name (or TPU_NAME) is required'
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die_usage "--name=$NAME is invalid: lower-case letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die_usage '--zone (or TPU_ZONE) is required, e.g. --zone=us-central2-b'
  [[ $SLICES =~ ^[1-9][0-9]*$ ]] || die_usage "--slices=$SLICES is invalid: must be a positive integer"
  if ((NO_QUEUE && SLICES > 1)); then
    die_usage '--no-queue is invalid with --slices > 1: multislice TPUs exist only as queued resources'
  fi
  QR=${QR:-$NAME}
  LOC=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")
  if ((!DRY_RUN)); then
    command -v gcloud >/dev/null || { echo 'error: gcloud not found: install the Google Cloud CLI' >&2; exit 2; }
    ssh-add -l >/dev/null 2>&1 || echo 'note: for commands on every worker gcloud recommends' \
      '`ssh-add ~/.ssh/google_compute_engine` first' >&2
  fi
}

# on_workers CMD [WHICH]: run the shell command CMD on every worker of every
# slice (WHICH=all, the default) or on process 0's worker (WHICH=0).
on_workers() {
  local which=${2:-all}
  if ((SLICES > 1)); then
    run gcloud compute tpus queued-resources ssh "$QR" "${LOC[@]}" \
      --node="$which" --worker="$which" --command="$1"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$which" --command="$1"
  fi
}
