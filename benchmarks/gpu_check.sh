#!/usr/bin/env bash
# Issue 17's GPU measurements as one prepared run for a device session (about 8 minutes on one
# H200 once the machine is up; every step has its own timeout and lora_step.py rewrites its JSON
# after every model, so a step cut short still leaves the models it finished):
#
#   * ViT-S/16 and ViT-B/16, batch 128, img 224 (fp32 weights, bf16 autocast): frozen-base limit,
#     ours, peft, eager and compiled (each transformer block compiled, mode="reduce-overhead":
#     CUDA graphs, for these host-bound models);
#   * Llama-1.1B, 8 x 2048 tokens (bf16 weights): the same, compiled in the default mode (this
#     model is bound by its matmuls, not by the host: CUDA graphs would only cost memory).
#
# Compiled variants run with --compile-recompute-inputs (the partitioner may recompute LoRA
# inputs, the setting docs/compile.md recommends: eager's memory floor under compile).
#
# Results go to $OUT (default /tmp/gpu_check); copy them to benchmarks/results/ and the figures to
# docs/compile.md after reading them.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh          # H200
#   bash benchmarks/gpu_check.sh --dry                       # print the commands, run nothing
#   bash benchmarks/gpu_check.sh --quick                     # the same steps on CPU, tiny shapes (a smoke run)
set -uo pipefail
MODE=gpu
case "${1:-}" in
  --dry) MODE=dry ;;
  --quick) MODE=quick ;;
  "") ;;
  *) echo "usage: $0 [--dry|--quick]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
EAGER=frozen,ours,peft
COMPILED=frozen_compiled,ours_compiled,peft_compiled
RECOMPUTE=(--compile-recompute-inputs)

if [ "$MODE" != quick ]; then  # the H200 run (--dry prints it)
  DEV=(--device cuda)
  VIT=(--models vit_s,vit_b --repeats 8 --warmup 3 --compile-mode reduce-overhead)
  LLAMA=(--models llama --repeats 6 --warmup 3)
  LLAMA_VARIANTS=frozen,ours,peft,peft_bf16,frozen_compiled,ours_compiled,peft_compiled
  T_VIT=300 T_LLAMA=270
else  # CPU smoke run: the same steps and flags at tiny shapes, one timed round
  DEV=(--device cpu --quick --threads 2)
  VIT=(--models vit_s --img 32 --batch 2 --repeats 1 --warmup 1)
  LLAMA=(--models llama --seq 32 --repeats 1 --warmup 1)
  LLAMA_VARIANTS=frozen,ours,frozen_compiled,ours_compiled
  EAGER=frozen,ours COMPILED=frozen_compiled,ours_compiled
  T_VIT=600 T_LLAMA=600
fi

run() {  # run NAME TIMEOUT ARGS...: one lora_step.py invocation, its log in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local cmd=(timeout "$limit" python benchmarks/lora_step.py "$@" --out "$OUT/$name.json")
  echo "+ ${cmd[*]}"
  [ "$MODE" = dry ] && return 0
  "${cmd[@]}" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
  grep -E "^(frozen|ours|peft)|summary|ERROR" "$OUT/$name.log"
}

if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
[ "$MODE" = dry ] || python -c "import torch, timm, transformers, peft; print(torch.__version__, timm.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"

# ViT-S/16 and ViT-B/16 at batch 128: eager and compiled (reduce-overhead) in one interleaved run
run lora_step_cuda_vit "$T_VIT" "${DEV[@]}" "${VIT[@]}" "${RECOMPUTE[@]}" --variants "$EAGER,$COMPILED"
# Llama-1.1B at 8 x 2048: eager and compiled (default mode)
run lora_step_cuda_llama "$T_LLAMA" "${DEV[@]}" "${LLAMA[@]}" "${RECOMPUTE[@]}" --variants "$LLAMA_VARIANTS"
echo "results in $OUT"
