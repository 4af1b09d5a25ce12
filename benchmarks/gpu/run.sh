#!/usr/bin/env bash
# The GPU measurement of issue 3 in one device call (this workplace lends a GPU machine for 15 minutes of device time
# in all, start included). Build the bundle first, here: `bash benchmarks/gpu/bundle.sh`. Then, through the device
# tool, from the repository root:
#
#   run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=600)
#
# It unpacks the bundle, prints the machine and versions, probes envpool's XLA interface on the GPU
# (benchmarks/gpu/probe.py), then runs benchmarks/rl_throughput.py on the GPU and, as the same-machine baseline,
# on its 16 CPU cores (JAX_PLATFORMS=cpu), each under its own time limit. Every table is also written to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/jaxdp-gpu-out}
SITE=${SITE:-/tmp/jaxdp-site}
GPU_SECONDS=${GPU_SECONDS:-280}
CPU_SECONDS=${CPU_SECONDS:-240}
mkdir -p "$OUT" "$SITE"
BUNDLE=${BUNDLE:-.gpu/site.tar.xz}
tar -xJf "$BUNDLE" -C "$SITE" || { echo "run.sh: cannot unpack $BUNDLE: run benchmarks/gpu/bundle.sh first"; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; python3 -c "
import jax, flax, optax, chex, orbax.checkpoint as ocp, envpool, numpy
print('python', __import__('sys').version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__,
      '| optax', optax.__version__, '| chex', chex.__version__, '| orbax', ocp.__version__, '| envpool',
      envpool.__version__, '| numpy', numpy.__version__)"; } 2>&1 | tee "$OUT/machine.txt"
echo
timeout 60 python3 benchmarks/gpu/probe.py 2>&1 | tee "$OUT/probe.md"
echo
# --skip-sweep: the sweep timings are CartPole compile-and-run, a CPU question. Pong DQN's replay stays at 50k.
# Both limits together stay inside one call's 600 s.
timeout "$GPU_SECONDS" python3 benchmarks/rl_throughput.py --skip-sweep --repeats 3 2>&1 | tee "$OUT/rl_throughput_gpu.md"
echo "gpu benchmark exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/rl_throughput_gpu.md"
JAX_PLATFORMS=cpu timeout "$CPU_SECONDS" python3 benchmarks/rl_throughput.py --skip-sweep --repeats 3 2>&1 \
  | tee "$OUT/rl_throughput_cpu16.md"
echo "cpu benchmark exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/rl_throughput_cpu16.md"
