#!/usr/bin/env bash
# torchrun without the `bigmodel` command: one node, or one of several meeting at a c10d rendezvous.
#   launch/torchrun.sh configs/tiny.yaml --parallel.dp_shard=4                       # NPROC=4 by default
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29400 NPROC=8 launch/torchrun.sh configs/base.yaml --parallel.dp_shard=16
#   (the same on node 1 with NODE_RANK=1). MAX_RESTARTS=N restarts failed workers, which resume (--resume auto).
# `bigmodel launch` builds the same command and checks the layout first (docs/launching.md).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: [NPROC=N NNODES=N NODE_RANK=R RDZV_ENDPOINT=HOST:PORT MAX_RESTARTS=N] $0 CONFIG [overrides]" >&2; exit 2; }
config=$1; shift
NPROC=${NPROC:-4} NNODES=${NNODES:-1} MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
if [ "$NNODES" -eq 1 ]; then
    where=(--standalone)
else
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT (address of the first node) for NNODES > 1}"
    where=(--nnodes="$NNODES" --node-rank="${NODE_RANK:?set NODE_RANK}" --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT")
fi
resume=()
if [ "$MAX_RESTARTS" -gt 0 ]; then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # restarts need a fresh store (pytorch issue 135712)
    resume=(--resume auto)
fi
exec "$PYTHON" -m torch.distributed.run --nproc-per-node="$NPROC" "${where[@]}" --max-restarts="$MAX_RESTARTS" \
    -m bigmodel.train --config "$config" "$@" "${resume[@]}"
