#!/usr/bin/env bash
# SLoPe pretraining under mpirun (Open MPI or MPICH): one process per GPU, ranks from MPI discovery.
#
#   NP=16 HOSTS=node1:8,node2:8 launch/mpirun_pretrain.sh --model llama-1b --max_steps 20000 --output_dir runs/1b
#   NP=2 launch/mpirun_pretrain.sh --max_steps 50            # one machine (CPU without a GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
export MASTER_PORT=${MASTER_PORT:-29500}
hosts=()
if [ -n "${HOSTS:-}" ]; then hosts=(-hosts "$HOSTS"); fi
exec mpiexec -n "$NP" "${hosts[@]}" python launch/pretrain.py "$@"
