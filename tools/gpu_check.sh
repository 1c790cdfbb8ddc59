#!/usr/bin/env bash
# The GPU acceptance run (docs/gpu-check.md): installs cmvae-engine without network, builds the extension with
# its CUDA half, then runs the stages of bench/gpu_check.py; results go to $OUT when set, else bench/results/.
#   tools/gpu_check.sh                        every stage
#   tools/gpu_check.sh --stage kernels,train  some stages
#   tools/gpu_check.sh --list | --dry-run     the stages; the CPU rehearsal with tiny shapes
# The interpreter: $PYTHON, else this checkout's .venv, else python3 (a lent GPU machine's, with CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
exec "$py" bench/gpu_check.py --python "$py" "$@"
