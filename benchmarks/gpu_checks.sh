#!/usr/bin/env bash
# The GPU checks in one or two device calls (../shared/DEVICE.md): the `gpu`-marked tests, the
# GPU speed table (benchmarks/epoch.py, ResNet-18 at 84 px, batch 256, the whole mini-ImageNet
# size on FakeData, with the PyTorch reference: all of it in bfloat16, the step in float32), the
# jax k-means alone and the digits job. Measured on an H200 (benchmarks/RESULTS.md): ~16 s for
# two of the gpu tests (the two that run a warm-up and a ProtoNCE epoch have a 180 s limit); ~90 s
# to build and compile before the first E-step; float32 step-only ~100 s. All stages take about
# 11 minutes with the machine's start: rerun a single stage, not the whole script, if one fails.
# `augment` is the epoch with data.augment_on_device (the step augments; the loader only draws),
# not yet timed on a GPU.
#
#   OUT=/tmp/gpu_checks bash benchmarks/gpu_checks.sh     # from the repo root, on a GPU machine
#   bash benchmarks/gpu_checks.sh tests epoch              # only these stages
#
# Stages, in order: tests, epoch (bfloat16 table), kmeans, kmeans0, augment, step (float32), digits. A
# device call runs at most 600 s, so on a lent machine run `tests epoch` in one call (<= 510 s)
# and `kmeans augment digits` in the next (<= 410 s), right after, while the machine is still
# warm; `step` (<= 120 s) and `kmeans0` (the k-means without XLA's autotuning, <= 120 s) only
# if time is left.
#
# Wheels in .whl/ (faiss-cpu, ml-collections: DEVICE.md) are installed into /tmp/site first.
# Each stage has its own time limit so a stage that hangs cannot take the later ones with it;
# every log lands in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6} PYTHONUNBUFFERED=1
WORKERS=${WORKERS:-$(( $(nproc) > 12 ? 12 : $(nproc) ))}
STAGES=" ${*:-tests epoch kmeans kmeans0 augment step digits} "
stage() { [[ "$STAGES" == *" $1 "* ]]; }
nvidia-smi -L
python3 -c 'import jax, flax, optax, orbax.checkpoint as ocp, torch, torchvision, faiss
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", ocp.__version__, "torch", torch.__version__, "torchvision",
      torchvision.__version__, "faiss", faiss.__version__, jax.devices())'
stage tests && timeout "${TESTS_S:-180}" python3 -m pytest -q -m gpu tests 2>&1 \
  | tee "$OUT/gpu_tests.log"
# bfloat16: the whole table (step and PyTorch reference, input, feature pass, E-step, epoch);
# float32: the step and its PyTorch reference.
stage epoch && timeout "${EPOCH_S:-330}" python3 benchmarks/epoch.py --num-images 38400 \
  --batch 256 --dtype bfloat16 --backend jax --workers "$WORKERS" --steps 30 --torch-reference \
  2>&1 | tr '\r' '\n' | grep -v -e '%|' -e cuda_timer | tee "$OUT/epoch_bfloat16.log"
# The jax k-means alone at mini-ImageNet's size: compile and run seconds per cluster count.
stage kmeans && timeout "${KMEANS_S:-120}" python3 benchmarks/clustering.py --backends jax \
  --sizes 38400 --ks 100,3200 --window 3200,2400,1600 2>&1 | tee "$OUT/clustering.log"
# The same with XLA's GPU autotuning off: if the compile column drops by most of its seconds,
# the k-means' jits should pass compiler_options={'xla_gpu_autotune_level': 0} on a GPU
# (clustering.py's module doc, "Compilation").
stage kmeans0 && XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout "${KMEANS_S:-120}" \
  python3 benchmarks/clustering.py --backends jax --sizes 38400 --ks 100,3200 \
  --window 3200,2400,1600 2>&1 | tee "$OUT/clustering_autotune0.log"
# data.augment_on_device against the `epoch` stage's loader-bound epoch: the loader's rate, the
# step with the augmentation in it, and M-steps fed by the loader (faiss-cpu clusters: nothing
# to compile; 100 M-steps).
stage augment && timeout "${AUGMENT_S:-200}" python3 benchmarks/epoch.py --num-images 38400 \
  --batch 256 --dtype bfloat16 --backend faiss --workers "$WORKERS" --steps 30 \
  --epoch-steps 100 --augment-on-device 2>&1 | tr '\r' '\n' | grep -v -e '%|' -e cuda_timer \
  | tee "$OUT/epoch_augment_on_device.log"
stage step && timeout "${STEP_S:-120}" python3 benchmarks/epoch.py --num-images 3840 \
  --batch 256 --dtype float32 --workers "$WORKERS" --steps 30 --torch-reference --step-only \
  2>&1 | grep -v cuda_timer | tee "$OUT/epoch_float32.log"
# The main job on the GPU: with k padded on an accelerator its 7 cluster counts share one k-means
# compilation (without the padding it took 10-15 s per count on an H200, against 1.7 s epochs).
stage digits && timeout "${DIGITS_S:-90}" python3 -m pcl_jax.main --config=configs/digits.py \
  --workdir=/tmp/digits_gpu 2>&1 | tr '\r' '\n' | grep -v -e '%|' -e cuda_timer | tail -40 \
  | tee "$OUT/digits.log"
