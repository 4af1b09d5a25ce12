#!/usr/bin/env bash
# Packs what this workplace's GPU machines lack into .gpu/site.tar.xz, for benchmarks/gpu/run.sh to unpack there.
#
# Those machines hold CUDA, Python 3.12 with jax (and its CUDA plugin), flax, optax, chex, orbax-checkpoint, numpy,
# scipy, matplotlib and tqdm, but no envpool, gymnasium or tensorboardX, and they reach no package index. A call may
# carry 64 MiB in all, and envpool's wheels alone are 115 MB, so the bundle keeps envpool's Atari and classic-control
# families and the Atari ROMs, and drops the other families (their ids are then unknown there). xz brings it to
# ~10 MB.
#
#   bash benchmarks/gpu/bundle.sh            # wheels for CPython 3.12 (the GPU machines' Python)
#   PY=3.11 bash benchmarks/gpu/bundle.sh    # for this machine's Python, to try the bundle here first
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-3.12}
OUT_DIR=${OUT_DIR:-.gpu}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# The versions this project pins (pyproject.toml) where it pins them; their dependencies that the machines lack.
# flax, optax and chex are there too, in versions of their own: these (plain Python, first on PYTHONPATH) keep the
# library the one measured on CPU. jax stays the machine's (0.11.2 with CUDA 13 when last read; jaxdp's tests and
# benchmarks passed under jax 0.11.2 on CPU with these pins).
python3 -m pip install --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${platforms[@]}" --target "$stage/site" \
  envpool==1.2.5 envpool-assets==0.3.0 gymnasium==1.4.0 farama-notifications==0.0.6 dm-env==1.6 dm-tree==0.1.10 \
  optree==0.20.0 tensorboardX==2.6.5 flax==0.12.8 optax==0.2.8 chex==0.1.92

# Each family's package imports its compiled module, and envpool/entry.py imports every family's registration:
# keep two families, and an entry.py that registers those two.
for family in box2d gfootball highway jumanji minigrid mujoco pgx procgen toy_text vizdoom; do
  rm -rf "${stage:?}/site/envpool/$family"
done
rm -rf "$stage/site/envpool_assets/"{gfootball,mujoco,procgen,vizdoom} "$stage/site/bin"
cat > "$stage/site/envpool/entry.py" <<'PY'
"""Entry point of envpool's registrations, cut by jaxdp's benchmarks/gpu/bundle.sh to the two families it keeps."""

import envpool.atari.registration  # noqa: F401
import envpool.classic_control.registration  # noqa: F401
PY
mkdir -p "$OUT_DIR"
tar -C "$stage/site" -cf - . | xz -6 -T0 > "$OUT_DIR/site.tar.xz.part"
mv "$OUT_DIR/site.tar.xz.part" "$OUT_DIR/site.tar.xz"  # never a half-written bundle
echo "$OUT_DIR/site.tar.xz: $(du -h "$OUT_DIR/site.tar.xz" | cut -f1) for CPython $PY"
