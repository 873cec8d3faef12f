#!/usr/bin/env bash
# The H200 run: every GPU benchmark in one call, results and logs under $NLORA_RESULTS (default $OUT).
# Usage on the device machine, from the repository root:  bash benchmarks/run_gpu.sh [train infer loss init]
# Pass NLORA_COMMIT=<hash> for the JSON's machine.nlora_commit: the device's copy of .git may report a stale HEAD.
# (other parts: train-decoder, train-function, train-compile, host, pinv, init-batch, init-nofull, cuda-tests)
set -uo pipefail
export NLORA_RESULTS=${NLORA_RESULTS:-${OUT:-benchmarks/results}} PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
LOG=$NLORA_RESULTS/gpu_log.txt
parts=${*:-train infer loss init}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv | tee -a "$LOG"
for part in $parts; do
  echo "=== $part $(date -u +%T)" | tee -a "$LOG"
  case $part in
    train) timeout 250 $PY benchmarks/bench_train.py --layers 2 --rounds 2 --profile --compile --compile-budget 100 ;;
    train-decoder) timeout 240 $PY benchmarks/bench_train.py --head none --foreach-adam --layers 2 --rounds 2 \
                     --profile --compile --compile-budget 110 --name train_7b_cuda_decoder_foreach ;;
    train-function) timeout 200 $PY benchmarks/bench_train.py --layers 2 --rounds 2 --only floor \
                     'peft-lora (fp32 adapters, default)' 'peft-lora (bf16 adapters)' nlora-lora nlora-slora \
                     nlora-nystrom nlora-inttune 'nlora-nystrom (bf16 params)' \
                     --graph floor 'peft-lora (fp32 adapters, default)' 'peft-lora (bf16 adapters)' nlora-lora \
                     nlora-slora nlora-nystrom nlora-inttune \
                     --profile floor nlora-nystrom nlora-inttune --name train_7b_cuda_function ;;
    train-compile) timeout 240 $PY benchmarks/bench_train.py --rounds 1 --iters 30 --only floor --no-host \
                     --compile floor 'peft-lora (bf16 adapters)' 'peft-lora (fp32 adapters, default)' nlora-lora \
                     nlora-slora nlora-nystrom nlora-inttune --compile-budget 180 --name train_7b_cuda_compiled ;;
    host)  timeout 60 $PY benchmarks/bench_host.py --device cuda ;;
    pinv)  timeout 60 $PY benchmarks/bench_init.py --device cuda --pinv-micro ;;
    infer) timeout 70 $PY benchmarks/bench_infer.py --layers 2 --rounds 2 ;;
    loss)  timeout 90 $PY benchmarks/bench_loss.py --steps 300 ;;
    init)  timeout 190 $PY benchmarks/bench_init.py --shape 7b --device cuda --dtypes float32 bfloat16 --repeats 2 ;;
    init-batch) for dt in float32 bfloat16; do timeout 150 $PY benchmarks/bench_init_batch.py --device cuda --shape 7b --dtype $dt; done ;;
    init-nofull) timeout 140 $PY benchmarks/bench_init.py --shape 7b --device cuda --dtypes float32 bfloat16 --repeats 2 --full-layers 0 ;;
    cuda-tests) timeout 70 $PY -m pytest -q -x -p no:cacheprovider tests/test_ridge.py tests/test_batched_init.py tests/test_fused_function.py tests/test_cuda.py ;;
  esac 2>&1 | grep -v -E "^USDT|profiler_st" | tee -a "$LOG"
done
echo "=== done $(date -u +%T)" | tee -a "$LOG"
