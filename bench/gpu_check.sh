#!/usr/bin/env bash
# One prepared GPU check: the recipe on CUDA in bf16 (plain, compiled, with the delta and
# trained embeddings, QAPEX over an NF4 base) on the tiny offline assets, then the cost
# benchmark (bench/cost.py) on the GPU. Run from the repository root on a CUDA machine:
#
#     OUT=/tmp/gpu_check bash bench/gpu_check.sh
#
# It uses the machine's python3 and torch. Packages that python lacks (torchtune, torchao,
# torchdata, omegaconf, HF datasets, ...) can sit as wheels in .whl/ (see CONTRIBUTING.md);
# they are installed into /tmp/site. Logs and results go to $OUT.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# The package and the recipe from this checkout, without installing them.
export PYTHONPATH="$PWD:$PWD/recipes:${PYTHONPATH:-}"

nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, torchtune, torchao; print('torch', torch.__version__, 'torchtune', torchtune.__version__, 'torchao', torchao.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/device.txt"
python3 -m apex_tune.dev.tiny --output-dir /tmp/apex_tiny > "$OUT/tiny_assets.log" 2>&1 || exit 1
python3 -m apex_tune.dev.tiny --model qapex --output-dir /tmp/apex_tiny_qapex >> "$OUT/tiny_assets.log" 2>&1 || exit 1

# `tune run NAME` imports NAME as a module: apex_finetune resolves from recipes/ above.
recipe() {
    local name=$1 config=$2 assets=$3
    shift 3
    local start=$SECONDS
    timeout 200 python3 -c "import sys; from torchtune._cli.tune import main; sys.argv[0] = 'tune'; main()" \
        run apex_finetune --config "$config" assets_dir="$assets" output_dir="/tmp/run_$name" device=cuda "$@" \
        > "$OUT/$name.log" 2>&1
    local rc=$?
    local saved
    saved=$(ls -d /tmp/run_"$name"/stage_* 2>/dev/null | xargs -n1 basename 2>/dev/null | tr '\n' ' ')
    echo "$name: exit $rc, $((SECONDS - start)) s, saved: $saved; first/last loss: $(grep -o 'loss [0-9.]*' "$OUT/$name.log" | sed -n '1p;$p' | tr '\n' ' ')" \
        | tee -a "$OUT/summary.txt"
}
recipe bf16 configs/dev/tiny_apex.yaml /tmp/apex_tiny dtype=bf16
recipe bf16_compile configs/dev/tiny_apex.yaml /tmp/apex_tiny dtype=bf16 compile=True
recipe bf16_delta_embeddings configs/dev/tiny_apex.yaml /tmp/apex_tiny dtype=bf16 apex.delta=True apex.train_embeddings=True
recipe qapex_bf16 configs/dev/tiny_qapex.yaml /tmp/apex_tiny_qapex dtype=bf16
recipe qapex_bf16_delta_offload_adamw8bit configs/dev/tiny_qapex.yaml /tmp/apex_tiny_qapex dtype=bf16 apex.delta=True \
    enable_activation_offloading=True enable_activation_checkpointing=True optimizer._component_=torchao.optim.AdamW8bit

# The cost benchmark at its CPU batch (2 x 256: kernel launches dominate on a GPU) and at a
# batch a GPU is used with (8 x 2048 tokens).
for shape in "2 256" "8 2048"; do
    set -- $shape
    start=$SECONDS
    timeout 200 python3 -m bench.cost --device cuda --batch "$1" --seq "$2" --output "cost_cuda_$1x$2.json" \
        > "$OUT/cost_cuda_$1x$2.log" 2>&1
    echo "bench.cost --device cuda --batch $1 --seq $2: exit $?, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    cp "bench/results/cost_cuda_$1x$2.json" "$OUT/" 2>/dev/null
    grep -- "->" "$OUT/cost_cuda_$1x$2.log" | tee -a "$OUT/summary.txt"
done
