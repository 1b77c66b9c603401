#!/usr/bin/env bash
# The deepspeed launcher without the `bigmodel` command.
#   launch/deepspeed.sh configs/tiny.yaml --engine=deepspeed                  # this node, NPROC=2 processes
#   HOSTFILE=hosts launch/deepspeed.sh configs/base.yaml --engine=deepspeed   # 'HOST slots=N' per node, over ssh
# On CPU, NPROC sets the process count (the launcher otherwise counts NUMA nodes); a one-host localhost hostfile
# needs no ssh check. Works with either engine: the workers read RANK/LOCAL_RANK/WORLD_SIZE like torchrun's.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: [NPROC=N HOSTFILE=FILE MASTER_ADDR=A MASTER_PORT=P] $0 CONFIG [overrides]" >&2; exit 2; }
config=$1; shift
NPROC=${NPROC:-2} PYTHON=${PYTHON:-python}
hosts=()
if [ -n "${HOSTFILE:-}" ]; then
    hosts=(--hostfile="$HOSTFILE")
    [ "$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")" -eq 1 ] && hosts+=(--no_ssh_check --master_addr="${MASTER_ADDR:-127.0.0.1}")
fi
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus="$NPROC" "${hosts[@]}" --master_port="${MASTER_PORT:-29500}" \
    --no_local_rank --module bigmodel.train --config "$config" "$@"
