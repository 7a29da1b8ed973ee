#!/usr/bin/env bash
# One torchrun launcher per node; apex_finetune.sbatch runs it on every node with srun.
# Everything it needs comes from SLURM's environment, so it also runs without SLURM
# (tests/test_cluster.py runs it on one machine with these variables set).
#
#   SLURM_NNODES, SLURM_JOB_NODELIST, SLURM_JOB_ID   set by SLURM
#   APEX_CONFIG          shipped config name or YAML path (default llama2/7B_apex)
#   APEX_OUTPUT_DIR      required: a folder every node shares (resume state, checkpoints)
#   NPROC_PER_NODE       processes per node (default: SLURM_GPUS_ON_NODE, else 1)
#   RDZV_PORT            rendezvous port on the first node (default 29500)
#   MAX_RESTARTS         torchrun restarts after a worker dies (default 1)
#   TUNE                 the tune executable (default: tune on PATH)
# Further arguments are config overrides (key=value) for the recipe.
set -euo pipefail

: "${SLURM_NNODES:?run this under SLURM (or set SLURM_NNODES)}"
: "${SLURM_JOB_NODELIST:?run this under SLURM (or set SLURM_JOB_NODELIST)}"
: "${APEX_OUTPUT_DIR:?set APEX_OUTPUT_DIR to a folder every node shares}"

# The rendezvous runs on the first node of the allocation.
if command -v scontrol >/dev/null 2>&1; then
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
elif [[ "$SLURM_JOB_NODELIST" == *"["* ]]; then
    echo "launch.sh: SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST is compressed; expanding it needs scontrol" >&2
    exit 2
else
    head_node=${SLURM_JOB_NODELIST%%,*}
fi

# torchrun's shared rendezvous store breaks restarts (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

# resume_from_checkpoint=True: a restart (torchrun) or a requeue (SLURM) continues
# from the last saved state; the first launch starts fresh.
exec "${TUNE:-tune}" run \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$head_node:${RDZV_PORT:-29500}" \
    --rdzv-id "${SLURM_JOB_ID:-apex}" \
    --max-restarts "${MAX_RESTARTS:-1}" \
    apex_finetune --config "${APEX_CONFIG:-llama2/7B_apex}" \
    output_dir="$APEX_OUTPUT_DIR" \
    resume_from_checkpoint=True \
    "$@"
