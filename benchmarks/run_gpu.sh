#!/usr/bin/env bash
# The GPU run (one H200): train_step.py for both batch shapes, then init_time.py. Each script writes its JSON and
# PNG straight into $OUT (the device machine's return folder; benchmarks/results when $OUT is unset), and the
# console output of both goes to $OUT/gpu_log.txt too.
# Usage, from the repository root:  NLORA_COMMIT=<git hash of the checkout> bash benchmarks/run_gpu.sh
# (NLORA_COMMIT lands in each JSON's machine.nlora_commit; without it the scripts ask git, which may be stale there.)
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log=$out/gpu_log.txt
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$log"
python3 benchmarks/train_step.py --shapes 4x2048 2x1024 --rounds 11 --out "$out" 2>&1 | tee -a "$log" || status=1
python3 benchmarks/init_time.py --dtypes float32 bfloat16 --repeats 7 --out "$out" 2>&1 | tee -a "$log" || status=1
echo "run_gpu.sh: exit status $status" | tee -a "$log"
exit $status
