#!/usr/bin/env bash
# Start N processes of one jsdr command on this machine, as a multi-host run would on N hosts:
#
#     scripts/launch_local.sh N python -m jsdr.train --method=opsd --train.steps=4
#
# Each process gets --dist.coordinator=127.0.0.1:PORT --dist.num_processes=N --dist.process_id=I
# appended to the command, and its own devices: with GPUs visible (nvidia-smi), an equal share of
# them through CUDA_VISIBLE_DEVICES; else JAX's CPU backend with LOCAL_DEVICES virtual devices per
# process (default 4: 2 processes x 4 devices is the same 8-device mesh as one process with
# XLA_FLAGS=--xla_force_host_platform_device_count=8). Output lines are prefixed with [I].
# Exit status: 0 when every process exits 0, else the first non-zero status (by process index).
# PORT: $JSDR_PORT or a free one.
set -uo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND [ARGS...]   (N processes of COMMAND on this machine)" >&2
  exit 2
fi
n=$1; shift
port=${JSDR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
gpus=()
if command -v nvidia-smi >/dev/null 2>&1 && [ -z "${JAX_PLATFORMS:-}" ]; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
fi
if [ ${#gpus[@]} -gt 0 ] && [ $(( ${#gpus[@]} % n )) -ne 0 ]; then
  echo "$0: ${#gpus[@]} GPUs do not split evenly over $n processes" >&2
  exit 2
fi
pids=()
for ((i = 0; i < n; i++)); do
  (
    if [ ${#gpus[@]} -gt 0 ]; then
      per=$(( ${#gpus[@]} / n ))
      export CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${gpus[*]:$((i * per)):$per}")
    else
      export JAX_PLATFORMS=cpu
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LOCAL_DEVICES:-4}"
    fi
    exec "$@" --dist.coordinator=127.0.0.1:"$port" --dist.num_processes="$n" --dist.process_id="$i"
  ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  wait "${pids[$i]}"; rc=$?
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
done
exit $status
