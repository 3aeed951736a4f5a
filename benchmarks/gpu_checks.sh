#!/usr/bin/env bash
# The GPU checks in one run (../shared/DEVICE.md): the `gpu`-marked tests, the issue-7 table
# (benchmarks/epoch.py, ResNet-18 at 84 px, batch 256, bfloat16 then float32, the whole
# mini-ImageNet size on FakeData, with the PyTorch reference) and the digits job on the GPU.
#
#   OUT=/tmp/gpu_checks bash benchmarks/gpu_checks.sh     # from the repo root, on a GPU machine
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
nvidia-smi -L
python3 -c 'import jax, flax, optax, orbax.checkpoint as ocp, torch, torchvision, faiss
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", ocp.__version__, "torch", torch.__version__, "torchvision",
      torchvision.__version__, "faiss", faiss.__version__, jax.devices())'
timeout "${TESTS_S:-100}" python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
for dtype in bfloat16 float32; do
  timeout "${EPOCH_S:-190}" python3 benchmarks/epoch.py --num-images 38400 --batch 256 \
    --dtype "$dtype" --backend jax --workers "$WORKERS" --steps 30 --torch-reference \
    2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$OUT/epoch_$dtype.log"
done
timeout "${DIGITS_S:-60}" python3 -m pcl_jax.main --config=configs/digits.py \
  --workdir=/tmp/digits_gpu 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -30 | tee "$OUT/digits.log"
