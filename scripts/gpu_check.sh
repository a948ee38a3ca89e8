#!/usr/bin/env bash
# The GPU check of jsdr on a lent GPU machine (one H100 or H200): flash-attention numerics, attention
# speed (pallas / cudnn / xla), train-step MFU, decode tokens/s and the Pallas block sizes, in under 8
# minutes, as one table (stdout) and as $OUT/gpu_check.{json,md} (or ./gpu_check_out/, or --out DIR).
#
#   scripts/gpu_check.sh                 # the real sizes
#   scripts/gpu_check.sh --smoke         # tiny shapes, seconds (also on a CPU: Pallas interpret mode)
#   scripts/gpu_check.sh --sections a,e  # some sections only; see `python scripts/gpu_check.py --help`
#
# Uses $PYTHON (default python3) with jax (CUDA), flax, optax, orbax-checkpoint, pyyaml and tqdm; jsdr
# and jsdr_kernels come from this checkout (no install needed). GPU_CHECK_TIMEOUT (default 480 s) is a
# hard stop on top of the script's own budget (--budget, default 420 s): a run stopped by it still
# leaves the rows it measured in the output folder, and this wrapper prints them.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
for ((i = 1; i <= $#; i++)); do  # --out DIR / --out=DIR given to the script wins
  if [[ "${!i}" == --out ]]; then j=$((i + 1)); out="${!j}"; fi
  if [[ "${!i}" == --out=* ]]; then out="${!i#--out=}"; fi
done
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
py="${PYTHON:-python3}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >&2
timeout -k 10 "${GPU_CHECK_TIMEOUT:-480}" "$py" scripts/gpu_check.py --out "$out" "$@" 2> >(tee "$out/gpu_check.log" >&2)
rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
  echo "gpu_check: stopped by the ${GPU_CHECK_TIMEOUT:-480} s timeout; the rows measured before it:"
  cat "$out/gpu_check.md" 2>/dev/null
fi
exit $rc
