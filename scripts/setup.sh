#!/usr/bin/env bash
# Install asyncflow (editable) and its test tools into the current Python environment.
#
# torch first, deliberately: on a machine without a GPU we install the CPU build
# (torch==2.13.0, which these machines keep on disk), so resolving asyncflow's
# `torch>=2.3` later finds it satisfied and never downloads a multi-GB CUDA build.
# With an NVIDIA GPU present we leave torch to pip's default (CUDA) wheel.
# Elsewhere, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${1:-test}"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found; torch comes from pip's default (CUDA) wheel"
  else
    echo "setup: no GPU; installing the CPU build torch==${TORCH_VERSION:-2.13.0}"
    "$PY" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      "torch==${TORCH_VERSION:-2.13.0}"
  fi
fi
"$PY" -m pip install --quiet -e ".[${EXTRAS}]"
