#!/bin/bash
# Train on a Cloud TPU VM (a single host or a pod slice): runs train.py on
# every worker at once over `gcloud compute tpus tpu-vm ssh --worker=all`;
# JAX finds the other workers itself (--distributed=cluster).
#
#   launch/tpu.sh --name=NAME --zone=ZONE [--project=PROJECT] [--repo=DIR]
#                 [--python=python3] [--setup] [--dry-run] -- [train.py args]
#
# --repo: the repository on the workers (default gpt-jax, relative to the home
#   directory); copy or clone it to the same path on every worker first.
# --setup: first install requirements.txt with the TPU jax extra there.
# --dry-run: print the gcloud commands, run (and contact) nothing.
# The workdir must be on storage all workers share: Orbax writes each
# checkpoint from all of them together.
set -euo pipefail

usage() { sed -n '6,7p' "$0" | sed 's/^# *//' >&2; exit 2; }
name= zone= project= repo=gpt-jax python=python3 setup=0 dry_run=0
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
  shift
done
[[ -n $name && -n $zone ]] || usage

ssh=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone"
     ${project:+--project="$project"} --worker=all)
show() {  # a command as one shell line, quoting only the words that need it
  local w out=()
  for w; do [[ $w =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]] && out+=("$w") || out+=("${w@Q}"); done
  echo "${out[*]}"
}
run() {
  show "$@"
  ((dry_run)) || "$@"
}
remote() { echo "cd $(show "$repo") && $(show "$python" "$@")"; }
if ((setup)); then
  run "${ssh[@]}" --command="$(remote -m pip install -r requirements.txt 'jax[tpu]')"
fi
run "${ssh[@]}" --command="$(remote train.py --distributed=cluster "$@")"
