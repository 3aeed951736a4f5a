#!/bin/bash
# oneDNN called directly (PyPI's CPU-only onednn-cpu-gomp 2023.2 = oneDNN 3.2) against PyTorch's
# own oneDNN calls, for the convolutions of ResNet-18 at 32 px: how much an XLA FFI custom call
# with its own oneDNN could gain over `pcl_jax.kernels.torch_conv`. Needs g++ and network to PyPI; nothing
# is installed (the wheels are unpacked under $ONEDNN_DIRECT_DIR, default /tmp/onednn_direct).
#   bash benchmarks/onednn_direct/run.sh [--rounds N]          # the convolutions alone
#   bash benchmarks/onednn_direct/run.sh step [--case resnet18|resnet18_84] [--rounds N]
#       # the whole jitted step, runtime.conv_impl=onednn against torch
#   bash benchmarks/onednn_direct/run.sh step --layer bn|pool|residual [--case ...]
#       # both steps onednn; the BN (+ ReLU), the stem pool or the residual join in XLA's ops
#       # against oneDNN's
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${ONEDNN_DIRECT_DIR:-/tmp/onednn_direct}"
data="$work/unpacked"
if [ "${1:-}" = step ]; then
  # runtime.conv_impl=onednn builds its own library against the installed oneDNN (requirements.txt).
  shift
  exec python "$here/ffi_step.py" "$@"
fi
if [ ! -e "$data/lib/libdnnl.so.3" ]; then
  pip download --quiet --no-deps -d "$work/wheels" \
      onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0
  mkdir -p "$data"
  for wheel in "$work"/wheels/*.whl; do
    python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
        "$wheel" "$work/extracted"
  done
  # The wheels keep their files under <name>.data/data/{include,lib}: merge them.
  cp -r "$work"/extracted/*.data/data/* "$data/"
fi
g++ -O2 -std=c++17 "$here/convolutions.cpp" -I"$data/include" -L"$data/lib" -ldnnl \
    -Wl,-rpath,"$data/lib" -o "$work/convolutions"
python "$here/compare.py" --binary "$work/convolutions" "$@"
