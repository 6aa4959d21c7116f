#!/usr/bin/env bash
# The GPU measurements still owed by issues 2 and 3, as one prepared run for a device session
# (about 6 minutes on one H200 once the machine is up). Results go to $OUT (default
# /tmp/gpu_check); copy them to benchmarks/results/ and docs/ after reading them.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, timm, transformers, peft; print(torch.__version__, timm.__version__, transformers.__version__, peft.__version__)" | tee -a "$OUT/gpu.txt"

# issue 2: LoRA step vs the frozen-base limit and peft (ViT-S, ViT-B, Llama 1.1B), ~2 min
timeout 300 python benchmarks/lora_step.py --device cuda --out "$OUT/lora_step_cuda.json" > "$OUT/lora_step.log" 2>&1
echo "lora_step rc=$?"; grep -E "^(ours|peft|frozen|full)|summary" "$OUT/lora_step.log"

# issue 3: adaptive checkpointing Pareto points (static plans + adaptive at 50 % / 70 %), < 3 min
timeout 300 python benchmarks/adaptive_checkpoint.py --device cuda --quick \
  --out "$OUT/adaptive_checkpoint_cuda.json" --png "$OUT/adaptive_checkpointing_cuda.png" > "$OUT/adaptive.log" 2>&1
echo "adaptive_checkpoint rc=$?"; tail -30 "$OUT/adaptive.log"
