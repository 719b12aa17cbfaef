#!/bin/bash
# Device side of the fourth lease: `bash run_default.sh /root/runs/default` on the H200, re-run in consecutive calls.
#   bash devrun.sh start SECONDS   first call: start the run, SIGTERM it after SECONDS (training saves a checkpoint)
#   bash devrun.sh again SECONDS   start the same command again (it continues the run), leave it running, return
#   bash devrun.sh wait SECONDS    wait for the run to end (at most SECONDS)
# Every call puts the logs and results so far into $OUT/results.tar.gz.
mode=$1; limit=$2; T0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TRAIN_MLA_CACHE=/root/cache
export STAGE1_STEPS=${STAGE1_STEPS:-900}
R=/root/runs/default; C=/root/console.txt; TL=/root/timeline.txt
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[devrun $(date +%T)] $mode +$(el)s: $*" | tee -a $TL; }
cd /root/repo
[ -f /root/gpu_mem.csv ] || ( while true; do echo "$(date +%s),$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits)"; sleep 10; done >> /root/gpu_mem.csv 2>&1 & )
running() { pgrep -f "bash run_default.sh $R" > /dev/null; }
if [ "$mode" != wait ] && ! running; then
  log "start: STAGE1_STEPS=$STAGE1_STEPS bash run_default.sh $R"
  echo "===== $(date +%T) $mode: bash run_default.sh $R" >> $C
  setsid bash run_default.sh $R >> $C 2>&1 < /dev/null &
  sleep 2
fi
while running && [ $(el) -lt $limit ]; do sleep 5; done
if [ "$mode" = start ] && running; then
  pg=$(ps -o pgid= -p $(pgrep -f "bash run_default.sh $R" | head -1) | tr -d ' ')
  log "SIGTERM to process group $pg"
  kill -TERM -- -$pg
  for i in $(seq 60); do running || break; sleep 1; done
  log "after SIGTERM: running=$(running && echo yes || echo no)"
fi
running && log "still running" || log "run_default.sh not running"
ls $R/stage1 >> $TL 2>&1
cd /root && tar -czf $OUT/results.tar.gz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' --exclude=cache \
  --exclude='global_step*' --exclude='*.jsonl' --exclude='*.arrow' console.txt timeline.txt gpu_mem.csv \
  $(cd /root && ls -d runs/default/*.log runs/default/summary* runs/default/stage1_curve* runs/default/run_default.settings \
    runs/default/eval runs/default/stage1/*.json runs/default/stage1/checkpoint-*/trainer_state.json runs/default/dpo/*.json \
    runs/default/stage1/README.md runs/default/dpo/README.md 2>/dev/null) 2>/dev/null
ls -la $OUT; tail -5 $C; tail -3 $TL
