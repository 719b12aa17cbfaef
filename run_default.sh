#!/usr/bin/env bash
# The default run: the whole X-EcoMLA pipeline on the real SmolLM2-135M-Instruct, offline, in one command.
#   bash run_default.sh [OUTPUT_DIR]        (default: runs/default-<date>; the same folder again continues that run)
# On a GPU: smollm2_135M/default_run_gpu.yaml (the 25 % recovery recipe, DPO, the shared tasks); without one:
# smollm2_135M/default_run_cpu.yaml (a ~20-minute demonstration of the pipeline and the initialisation). What each
# step does, and what is kept when a run is continued: train_mla/default_run.py.
# Environment: RECIPE (GPU: another smollm2_135M/ stage-1 recipe), STAGE1_STEPS, ZERO_STAGE (default 2),
# TEACHER_SECONDS (GPU, default 240; 0 = none), QUICK=1 (every stage shrunk: tests), EVAL_PROGRESS_S (default 60),
# PYTHON (default python3). SIGTERM or Ctrl-C saves a checkpoint of the training step in progress and stops.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m train_mla.default_run "$@"
