#!/usr/bin/env bash
# One script that verifies a lent GPU (../shared/DEVICE.md), in one device call, writing one
# results file, $OUT/results.txt (every stage's figures, each under a header line; full logs
# beside it):
#   1. tests:    `pytest -m gpu` (the on-device transforms, the jax k-means against faiss-cpu,
#                a warm-up and a ProtoNCE epoch on the GPU);
#   2. resident: a mini-ImageNet-sized epoch (FakeData, ResNet-18 at 84 px, batch 256, float32)
#                with data.device_resident, after the step side by side with PyTorch's
#                (cudnn.benchmark on, NCHW and channels-last, then interleaved rounds);
#                the E-step at the notes' first levels (k = 3200, 2400, 1600) with the padded
#                jax k-means (clustering.pad_k=max: one program), its share of the epoch, and
#                the projection of 200 epochs beside the step-bound limit;
#   3. augment:  the same epoch with data.augment_on_device (the loader only draws);
#   4. loader:   the same epoch from the host loader's PIL workers;
#   5. kmeans:   faiss-cpu against the jax k-means at k = 3200 on the same features (times and
#                objective ratio): the cross-check of the clustering.
# The epochs run --epoch-steps M-steps and extrapolate the full epoch (benchmarks/epoch.py).
# Budget on one H100: under 8 minutes with the stage limits below (each stage has its own
# `timeout`, so one that hangs cannot take the later ones with it).
#
#   bash benchmarks/gpu_checks.sh             # on the GPU machine, from the repo root
#   bash benchmarks/gpu_checks.sh --dry-run   # the same code paths at tiny sizes, on a CPU
#
# --dry-run (tests/test_gpu_checks.py runs it) shrinks every size (Conv4 at 16 px, 64 fake
# images a split, 2-4 steps, k = 20) so the script's plumbing is checked without a GPU; its
# figures mean nothing. Wheels in .whl/ (faiss-cpu, ml-collections: DEVICE.md) are installed
# into /tmp/site first. Exits non-zero if any stage failed.
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"
if [ $DRY = 0 ] && compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75} PYTHONUNBUFFERED=1
# One compilation cache for every stage: the three epochs share their step, feature pass and
# k-means programs, so only the first pays their compilation (its "first E-step" line says how
# much the k-means took); the later ones start in seconds.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
WORKERS=${WORKERS:-$(( $(nproc) > 12 ? 12 : $(nproc) ))}
if [ $DRY = 1 ]; then
  # 64 fake images a split (train+val+test: 192), Conv4 at 16 px: seconds a stage on a CPU.
  EPOCH=(--num-images 64 --batch 16 --arch conv4 --image-size 16 --steps 2 --epoch-steps 4
         --workers 0 --interleaved-rounds 1 --round-steps 1)
  KMEANS=(--sizes 192 --ks 20 --window 20,10 --dim 16 --modes 20 --niter 2 --nredo 1)
  LIMIT_TESTS=120 LIMIT_EPOCH=120 LIMIT_KMEANS=60
else
  # 12,800 fake images a split: mini-ImageNet's 38,400 in the train+val+test pretraining split.
  EPOCH=(--num-images 12800 --batch 256 --steps 30 --epoch-steps 60 --workers "$WORKERS")
  KMEANS=(--sizes 38400 --ks 3200 --window 3200,2400,1600 --niter 20 --nredo 1)
  # Stage limits: 90 + 3 x 110 + 40 s = 7.7 minutes at the most.
  LIMIT_TESTS=90 LIMIT_EPOCH=110 LIMIT_KMEANS=40
fi
FAILED=0
# run NAME LIMIT COMMAND...: the command's output in $OUT/NAME.log, its figures in the results.
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" >> "$RESULTS"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "-- $name took $((SECONDS - start)) s" >> "$RESULTS"
  tr '\r' '\n' < "$OUT/$name.log" | grep -v -e '%|' -e cuda_timer -e '^INFO:' \
    | grep -E '[0-9]' | tail -40 >> "$RESULTS"
  if [ $status != 0 ]; then
    echo "!! $name exited with status $status (limit ${limit}s)" >> "$RESULTS"
    FAILED=1
  fi
}
{ nvidia-smi -L 2>/dev/null || echo "no GPU (dry run)"; } >> "$RESULTS"
python3 -c 'import jax, flax, optax, orbax.checkpoint as ocp, torch, torchvision, faiss
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", ocp.__version__, "torch", torch.__version__, "torchvision",
      torchvision.__version__, "faiss", faiss.__version__, jax.devices())' >> "$RESULTS" 2>&1
# In one process (tests/two_workers.py starts no workers under -m gpu): the GPU tests share the
# one device.
run tests $LIMIT_TESTS python3 -m pytest -q -m gpu tests
run resident $LIMIT_EPOCH python3 benchmarks/epoch.py "${EPOCH[@]}" --input resident \
  --backend jax --pad-k max --torch-reference
run augment $LIMIT_EPOCH python3 benchmarks/epoch.py "${EPOCH[@]}" --input augment \
  --backend jax --pad-k max
run loader $LIMIT_EPOCH python3 benchmarks/epoch.py "${EPOCH[@]}" --input loader \
  --backend jax --pad-k max
run kmeans $LIMIT_KMEANS python3 benchmarks/clustering.py --backends faiss-cpu,jax "${KMEANS[@]}"
cat "$RESULTS"
exit $FAILED
