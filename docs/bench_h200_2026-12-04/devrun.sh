#!/bin/bash
# Device side of the eighth lease (one H200): decode kernel sweep, FlashInfer's MLA kernel beside ours, the 1B/8B
# stage-1 rows through DistillTrainer (bf16 and FP8 teacher, single process and DeepSpeed), the engine with the new tile.
#   bash devrun.sh sweep      call 1: install the carried wheels, keep FlashInfer's first part, run the kernel sweep
#   bash devrun.sh peer       call 2: assemble + install FlashInfer (+ apache-tvm-ffi), ours vs FlashInfer
#   bash devrun.sh train1     call 3: 1B student / 8B teacher, single process: bf16 teacher, then FP8 teacher
#   bash devrun.sh train2     call 4: the same under accelerate + deepspeed_zero3.yaml (ZeRO-3), then the engine
#   (calls 5-7 were typed inline: the rows without flex attention, FlashInfer and ours at DeepSeek's shape; see README)
#   bash devrun.sh train3     call 8, a fresh machine after the LM-head fix: the single-process rows again, ZeRO-2
# Everything a call makes goes to $OUT; /root/w keeps what later calls need.
mode=$1; T0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export FLASHINFER_WORKSPACE_BASE=/root/w MAX_JOBS=16
W=/root/w; mkdir -p $W
log() { echo "[devrun $(date +%T)] $mode +$(( $(date +%s) - T0 ))s: $*" | tee -a $OUT/timeline.txt; }
T="python3 benchmarks/train_throughput.py --shape 1b_8b --batch 8 --documents --compile --attn flex_attention --steps 6 --warmup 3 --out $W/train"
A="accelerate launch --config_file deepspeed_zero3.yaml --num_processes 1"
case $mode in
sweep)
  cp .carry1/fipart.0 $W/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  log "wheels: $(python3 -c 'import transformers, trl, deepspeed, liger_kernel, torch, triton; print(transformers.__version__, trl.__version__, deepspeed.__version__, torch.__version__, triton.__version__)' 2>&1 | tail -1)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a $OUT/timeline.txt
  timeout 420 python3 benchmarks/decode_kernel_sweep.py $W/sweep.json > $OUT/sweep.log 2>&1; log "sweep rc=$?"
  cp $W/sweep.json $OUT/ 2>/dev/null; tail -3 $OUT/sweep.log ;;
peer)
  cat $W/fipart.0 .carry2/fipart.1 > $W/flashinfer_python-0.7.2.post1-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $W/flashinfer_python-0.7.2.post1-py3-none-any.whl .carry2/*.whl
  log "flashinfer: $(python3 -c 'import flashinfer; print(flashinfer.__version__)' 2>&1 | tail -1)"
  timeout 480 python3 benchmarks/flashinfer_mla_peer.py --tiles $W/sweep.json --out $OUT/flashinfer_mla > $OUT/peer.log 2>&1
  log "peer rc=$?"; tail -12 $OUT/peer.log ;;
train1)
  timeout 280 $T --loss liger > $OUT/train_bf16.log 2>&1; log "bf16 teacher rc=$?"
  timeout 260 $T --loss liger --teacher_fp8 > $OUT/train_fp8.log 2>&1; log "fp8 teacher rc=$?"
  cp $W/train.json $W/train.md $OUT/ 2>/dev/null; tail -2 $OUT/train_*.log ;;
train2)
  timeout 300 $A benchmarks/train_throughput.py --shape 1b_8b --batch 8 --documents --compile --attn flex_attention \
    --steps 6 --warmup 3 --loss chunked --out $W/train > $OUT/train_zero3.log 2>&1; log "zero3 rc=$?"
  timeout 200 python3 benchmarks/decode.py --compile --grid 1x1024 64x8192 --hf_points --budget_gib 0 \
    --tiles $W/sweep.json --out $OUT/decode > $OUT/decode.log 2>&1; log "decode rc=$?"
  cp $W/train.json $W/train.md $OUT/ 2>/dev/null; tail -2 $OUT/train_zero3.log; tail -8 $OUT/decode.log ;;
train3)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  B="benchmarks/train_throughput.py --shape 1b_8b --batch 8 --compile --steps 6 --warmup 3 --out $W/train"
  for v in "--loss chunked" "--loss liger" "--loss liger --teacher_fp8" "--loss liger --documents --attn flex_attention"; do
    timeout 150 python3 $B $v > $OUT/t.log 2>&1; log "single process $v rc=$?"; done
  timeout 170 $A --zero_stage 2 $B --loss liger > $OUT/z2.log 2>&1; log "zero2 liger rc=$?"
  timeout 150 python3 benchmarks/train_throughput.py --shape smollm2 --compile --documents --attn flex_attention \
    --loss liger --steps 10 --warmup 4 --out $W/train > $OUT/s.log 2>&1; log "smollm2 single process rc=$?"
  cp $W/train.json $W/train.md $OUT/ 2>/dev/null; tail -7 $W/train.md ;;
esac
log "done"
# call 11 (a fresh machine, nothing carried: torch and Triton of the image): the sweep again, with the balanced grid
#   python3 benchmarks/decode_kernel_sweep.py $OUT/sweep_balanced.json
