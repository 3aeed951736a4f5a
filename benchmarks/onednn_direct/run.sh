#!/bin/bash
# oneDNN called directly (PyPI's CPU-only onednn-cpu-gomp 2023.2 = oneDNN 3.2) against PyTorch's
# own oneDNN calls, for the convolutions of ResNet-18 at 32 px: how much an XLA FFI custom call
# with its own oneDNN could gain over `pcl_jax.cpu_conv`. Needs g++ and network to PyPI; nothing
# is installed (the wheels are unpacked under $ONEDNN_DIRECT_DIR, default /tmp/onednn_direct).
#   bash benchmarks/onednn_direct/run.sh [--rounds N]          # the convolutions alone
#   bash benchmarks/onednn_direct/run.sh step [--case resnet18|resnet18_84] [--rounds N]
#       # the whole jitted step with FFI custom calls (conv_ffi.cc) against cpu_conv
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${ONEDNN_DIRECT_DIR:-/tmp/onednn_direct}"
data="$work/unpacked"
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
if [ "${1:-}" = step ]; then
  shift
  g++ -O2 -std=c++17 -shared -fPIC "$here/conv_ffi.cc" -I"$data/include" \
      -I"$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')" -L"$data/lib" -ldnnl \
      -Wl,-rpath,"$data/lib" -o "$work/conv_ffi.so"
  # One XLA thread, as pcl_jax.main sets for a ResNet with host convolutions (host_threads).
  PJRT_NPROC=1 python "$here/ffi_step.py" --library "$work/conv_ffi.so" "$@"
else
  g++ -O2 -std=c++17 "$here/convolutions.cpp" -I"$data/include" -L"$data/lib" -ldnnl \
      -Wl,-rpath,"$data/lib" -o "$work/convolutions"
  python "$here/compare.py" --binary "$work/convolutions" "$@"
fi
