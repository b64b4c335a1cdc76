#!/usr/bin/env bash
# Builds and runs the standalone CUDA harness (no TensorFlow needed).
# Usage: benchmarks/gpu/run.sh [--quick] [--json PATH]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${TFBS_HARNESS_BIN:-/tmp/tfbs_bsr_matmul_harness}"
arch="${TFBS_CUDA_ARCH:-sm_90}"
nvcc -std=c++17 -O3 -arch="$arch" -o "$out" \
  "$here/bsr_matmul_harness.cu" "$here/../../ops/bsr_matmul_gpu_kernels.cu" -ldl
if [ -z "${TFBS_CUBLAS:-}" ]; then
  # PyTorch's wheels ship cuBLAS; use it when no system copy is on the path.
  TFBS_CUBLAS="$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia.cublas as c
    paths = glob.glob(os.path.join(list(c.__path__)[0], "lib", "libcublas.so*"))
    print(sorted(paths)[0] if paths else "")
except Exception:
    print("")
PY
)"
  export TFBS_CUBLAS
fi
exec "$out" "$@"
