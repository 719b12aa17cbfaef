#!/bin/bash
# Device side of the ninth lease (one H200): the fused decode layer against the engine before it (commit bb5ab38,
# carried as .carry_old/{train_mla,benchmarks}), same machine, same kernel tiles. Nothing else is carried: the image's
# torch 2.11, Triton 3.6 and transformers 5.17 run it.
#   bash devrun.sh engine     decode benchmark, after then before
#   bash devrun.sh profile    kernels of one step (no CUDA graph) at batch 1 x 1k and 64 x 8k, after then before
#   bash devrun.sh merge      the merge of the partials in chunks: the kernels' default tiles at three points, after
#                             then before (the new decode_kernel_sweep.py beside the old kernel), then the engine
mode=$1; T0=$(date +%s)
export PYTHONUNBUFFERED=1
log() { echo "[devrun $(date +%T)] $mode +$(( $(date +%s) - T0 ))s: $*" | tee -a $OUT/timeline.txt; }
D="benchmarks/decode.py --compile --grid 1x1024 64x8192 --hf_points --budget_gib 0"
case $mode in
engine)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a $OUT/timeline.txt
  timeout 270 python3 $D --out $OUT/decode_after > $OUT/after.log 2>&1; log "after rc=$?"; tail -12 $OUT/after.log
  (cd .carry_old && timeout 270 python3 $D --out $OUT/decode_before > $OUT/before.log 2>&1); log "before rc=$?"
  tail -12 $OUT/before.log ;;
profile)
  P="benchmarks/profile_decode.py --points 1x1024 64x8192 --compiled_only"
  timeout 280 python3 $P --out $OUT/profile_after.json > $OUT/profile_after.log 2>&1; log "after rc=$?"
  (cd .carry_old && timeout 280 python3 $P --out $OUT/profile_before.json > $OUT/profile_before.log 2>&1); log "before rc=$?"
  grep "launches" $OUT/profile_*.log ;;
merge)
  K="benchmarks/decode_kernel_sweep.py --default_only --points 1x1024 64x1024 64x8192"
  timeout 150 python3 $K $OUT/kernel_after.json > $OUT/kernel_after.log 2>&1; log "kernel after rc=$?"
  (cd .carry_old && timeout 150 python3 $K $OUT/kernel_before.json > $OUT/kernel_before.log 2>&1); log "kernel before rc=$?"
  grep -h '"us"' $OUT/kernel_*.log | cut -c1-60,120-400
  bash $0 engine ;;
esac
log "done"
