#!/bin/bash
# Device side of the fourth lease, second machine: stage 1 of the 25 % recipe on the README path, stopped by SIGTERM
# at step ~200 and resumed by the same command, then lm-eval of the result (shared tasks, full sets, --max_length 2048).
#   bash devrun2.sh go SECONDS    start it all in the background, wait SECONDS;   bash devrun2.sh wait SECONDS
mode=$1; limit=$2; T0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TRAIN_MLA_CACHE=/root/cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=/root/run; TL=/root/timeline.txt; mkdir -p $W
log() { echo "[devrun2 $(date +%T)] $*" | tee -a $TL; }
if [ "$mode" = go ]; then
cat > /root/job.sh <<'J'
cd /root/repo; W=/root/run; TL=/root/timeline.txt; SH=../shared/data
log() { echo "[job $(date +%T)] $*" >> $TL; }
S1=(python3 -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage 2 --num_processes 1
    train_mla/train_distill.py smollm2_135M/mla_kv_rank_80_rope_16.yaml --output_dir $W/A --max_steps 400
    --eval_steps 150 --save_steps 150 --processed_cache_dir /root/cache/tok
    --dataset_mixer "{data/sharegpt_all/chat_train.jsonl: 1.0, $SH/tinystories/tinystories_train_head.txt: 1.0, $SH/tinyshakespeare/input.txt: 1.0, $SH/wikitext-2/wiki.test.raw: 1.0}")
log "stage 1 start: ${S1[*]}"
"${S1[@]}" > $W/s1_part1.log 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null && ! grep -q "stage 1 | step 200/400" $W/s1_part1.log; do sleep 2; done
log "SIGTERM to the training (step 200 logged)"; pkill -TERM -f train_distill.py; wait $pid; log "part 1 rc=$? checkpoints: $(ls -d $W/A/checkpoint-* | xargs -n1 basename | tr '\n' ' ')"
log "the same command again"; "${S1[@]}" > $W/s1_part2.log 2>&1; log "part 2 rc=$?"
log "eval start"; bash eval.sh $W/A --tasks offline,shared --dtype bfloat16 --batch_size 16 --max_length 2048 --output $W/eval/A > $W/eval_A.log 2>&1
log "eval rc=$?"; touch /root/DONE
J
  log "go"; setsid bash /root/job.sh > /root/job.txt 2>&1 < /dev/null &
  sleep 2
fi
while [ ! -f /root/DONE ] && [ $(( $(date +%s) - T0 )) -lt $limit ]; do sleep 5; done
log "$mode returns, done=$([ -f /root/DONE ] && echo yes || echo no)"
cd /root && tar -czf $OUT/results.tar.gz --exclude='*.safetensors' --exclude='*.pt' --exclude=cache --exclude='global_step*' \
  timeline.txt job.txt $(ls -d run/*.log run/eval run/A/*.json run/A/README.md run/A/checkpoint-*/trainer_state.json 2>/dev/null) 2>/dev/null
tail -8 $TL; grep -a -o "\[train_mla\] stage 1 | step [0-9]*/400.*" $W/s1_part*.log | tail -4
