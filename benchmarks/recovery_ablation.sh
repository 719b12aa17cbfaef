#!/usr/bin/env bash
# Equal-token data ablation of stage 1 on SmolLM2-135M-Instruct at 25 % KV (smollm2_135M/mla_kv_rank_80_rope_16.yaml):
# one upcycled model, then one stage-1 run per arm with the same schedule, seed and number of steps, each arm's
# stage-1 evaluation curve (WikiText-2 test) and the shared tasks scored at the end (eval.sh --tasks shared).
#   bash benchmarks/recovery_ablation.sh OUT STEPS ARM [ARM ...]
# Arms (the data of each, all with ShareGPT + TinyStories + tinyshakespeare, the run_default.sh mix without teacher text):
#   base    ShareGPT (all 10,643 conversations, data/sharegpt_all) + TinyStories + tinyshakespeare
#   wiki    base + the first 13,400 rows of data/corpus/wikipedia.jsonl (python -m train_mla.corpus, docs/data.md)
#   books   base + wikipedia + the first 3,847 rows of data/corpus/books.jsonl (15 M tokens each)
#   wsd     books' data under warmup-stable-decay (decay over the last 20 % of steps) instead of cosine
#   peak    books' data at a higher peak learning rate: PEAK_LR (default 1e-3; the recipe's is 3e-4)
#   warm    books' data from a longer layer-wise warm start on the new text: the upcycling's refinement fits every
#           MLA layer to the source attention on 128 Wikipedia blocks for 2,400 steps (the recipe: 32 ShareGPT
#           blocks, 600 steps); WARM_ARGS replaces those settings
#   combined  the three together: warm's init, wsd's schedule at peak's rate (the long recipes' method)
#   rope32  combined with the same 96 cached values split as latent 64 + RoPE key 32 instead of 80 + 16 (is the narrow
#           shared RoPE key what LAMBADA loses?); its own warm-started upcycle
#   ce      combined with half the loss the text's own next-token cross-entropy (kl_weight 0.5, ce_weight 0.5): the
#           teacher's distribution alone, or the text too (MHA2MLA trains on the language-model loss alone)?
#   repeat  combined + data/corpus/repeat.jsonl (python -m train_mla.repeat_passages: passages repeated 200-1,000 words
#           later, docs/data.md): does distilling the teacher's copying from far back recover it (benchmarks/copy_probe.py)?
# Every arm trains in one process (python train_mla/train_distill.py); arms run one after another, each arm's
# evaluation runs beside the next arm's training. Needs ../shared/data, data/sharegpt, data/sharegpt_all, data/corpus.
# TRAIN_ARGS (recipe overrides for the upcycle and every arm) and EVAL_ARGS (eval.sh options) shrink it for a CPU check.
# UPCYCLE_ONLY=1 makes the arms' upcycled models and stops (e.g. beside other training on the same GPU); a later run
# with the same OUT reuses them, and one still being made by another run is waited for, not made twice.
# PREPARE_ONLY=1 tokenises each arm's data into OUT/cache (CPU only, e.g. beside the upcycling) and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1; STEPS=$2; shift 2
RECIPE=smollm2_135M/mla_kv_rank_80_rope_16.yaml
SH=../shared/data
BASE="data/sharegpt_all/chat_train.jsonl: 1.0, $SH/tinystories/tinystories_train_head.txt: 1.0, $SH/tinyshakespeare/input.txt: 1.0, $SH/wikitext-2/wiki.test.raw: 1.0"
WIKI="data/corpus/wikipedia.jsonl: 13400"; BOOKS="data/corpus/books.jsonl: 3847"; REPEAT="data/corpus/repeat.jsonl: 1.0"
WSD=(--lr_scheduler_type warmup_stable_decay --lr_scheduler_kwargs "{\"num_decay_steps\": $((STEPS / 5))}")
ROPE32=(--kv_lora_rank 64 --qk_rope_head_dim 32 --qk_nope_head_dim 32)
WARM_DEFAULT="--calibration_dataset data/corpus/wikipedia.jsonl --calibration_samples 128 --refine_steps 2400"
COMBINED=(${WARM_ARGS:-$WARM_DEFAULT} --learning_rate "${PEAK_LR:-1e-3}" "${WSD[@]}")  # warm + peak + wsd
stamp() { echo "[ablation $(date +%T)] $*"; }
upcycle() {  # DIR [recipe overrides]: the float32 upcycled model stage 1 reuses, written whole, once
  local dir=$1 lock; shift
  exec {lock}> "$dir.lock"; flock "$lock"  # another run making the same model: wait for it (released if it dies)
  if [ ! -d "$dir" ]; then
    stamp "upcycle $RECIPE $* (log: $dir.log)"
    python -m train_mla.upcycle $RECIPE ${TRAIN_ARGS:-} "$@" --torch_dtype float32 --output "$dir.tmp" > "$dir.log" 2>&1
    mv "$dir.tmp" "$dir"
  fi
  exec {lock}>&-
}
mkdir -p "$OUT/eval"
evals=()
for arm in "$@"; do
  extra=()
  case $arm in
    base) mix="$BASE" ;;
    wiki) mix="$BASE, $WIKI" ;;
    books) mix="$BASE, $WIKI, $BOOKS" ;;
    wsd) mix="$BASE, $WIKI, $BOOKS"; extra=("${WSD[@]}") ;;
    peak) mix="$BASE, $WIKI, $BOOKS"; extra=(--learning_rate "${PEAK_LR:-1e-3}") ;;
    warm) mix="$BASE, $WIKI, $BOOKS"; extra=(${WARM_ARGS:-$WARM_DEFAULT}) ;;  # stage 1 checks the upcycled record
    combined) mix="$BASE, $WIKI, $BOOKS"; extra=("${COMBINED[@]}") ;;
    rope32) mix="$BASE, $WIKI, $BOOKS"; extra=("${COMBINED[@]}" "${ROPE32[@]}") ;;
    repeat) mix="$BASE, $WIKI, $BOOKS, $REPEAT"; extra=("${COMBINED[@]}") ;;
    ce) mix="$BASE, $WIKI, $BOOKS"; extra=("${COMBINED[@]}" --kl_weight 0.5 --ce_weight 0.5) ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
  esac
  train_args=($RECIPE --output_dir "$OUT/$arm" --max_steps "$STEPS" --eval_steps $((STEPS / 4)) --save_steps 100000
              --dataset_mixer "{$mix}" --processed_cache_dir "$OUT/cache" --preprocessing_num_workers 12 ${TRAIN_ARGS:-}
              "${extra[@]}")
  if [ -n "${PREPARE_ONLY:-}" ]; then
    stamp "arm $arm: tokenising {$mix} (log: $OUT/$arm.prepare.log)"
    python -m train_mla.prepare_data "${train_args[@]}" > "$OUT/$arm.prepare.log" 2>&1; continue
  fi
  if [ "$arm" = warm ] || [ "$arm" = combined ] || [ "$arm" = repeat ] || [ "$arm" = ce ]; then upcycled="$OUT/upcycled_warm"; upcycle "$upcycled" ${WARM_ARGS:-$WARM_DEFAULT}
  elif [ "$arm" = rope32 ]; then upcycled="$OUT/upcycled_warm_rope32"; upcycle "$upcycled" ${WARM_ARGS:-$WARM_DEFAULT} "${ROPE32[@]}"
  else upcycled="$OUT/upcycled"; upcycle "$upcycled"; fi  # one upcycled model for every other arm, made once
  [ -n "${UPCYCLE_ONLY:-}" ] && continue
  if [ ! -f "$OUT/$arm/config.json" ]; then
    mkdir -p "$OUT/$arm"; [ -d "$OUT/$arm/upcycled" ] || cp -r "$upcycled" "$OUT/$arm/upcycled"
    stamp "arm $arm: $STEPS steps x 65,536 tokens on {$mix} ${extra[*]} (log: $OUT/$arm.log)"
    t0=$(date +%s)
    python train_mla/train_distill.py "${train_args[@]}" > "$OUT/$arm.log" 2>&1
    stamp "arm $arm: stage 1 done in $(( $(date +%s) - t0 )) s"
    rm -rf "$OUT/$arm/upcycled"
  fi
  stamp "arm $arm: scoring (log: $OUT/eval/$arm/eval.log)"
  bash eval.sh "$OUT/$arm" --tasks shared --dtype bfloat16 --batch_size 16 --max_length 2048 ${EVAL_ARGS:-} --output "$OUT/eval/$arm" \
    > /dev/null 2>&1 &
  evals+=($!)
done
for pid in "${evals[@]}"; do wait "$pid" || stamp "an evaluation failed (see $OUT/eval/*/eval.log)"; done
stamp "all arms done"
