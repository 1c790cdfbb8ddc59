#!/usr/bin/env bash
# Creates .venv and installs cmvae-engine into it. Idempotent: a second run only checks.
#   tools/setup.sh         runtime install (what `cmvae-engine train` needs)
#   tools/setup.sh --dev   plus the test, lint, kernel and data extras
# torch: on a machine without an NVIDIA GPU the CPU build pinned in .ci/constraints.txt is used (a plain
# `pip install torch` would pull several GB of CUDA packages). With a GPU, the torch already installed in
# the venv is kept; set CMVAE_TORCH (e.g. "torch==2.11.0") to choose one.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
constraints=()
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${CMVAE_TORCH:-}" ]; then
    "${pip[@]}" "$CMVAE_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" -c .ci/constraints.txt torch
  fi
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
  :  # CUDA torch: keep it, no CPU pin
else
  constraints=(-c .ci/constraints.txt)
fi
"${pip[@]}" "${constraints[@]}" -e ".${extras}"
.venv/bin/python tools/build_extension.py || true  # C++ ops; on failure it says why, and the torch backend is used
echo "cmvae-engine installed in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
