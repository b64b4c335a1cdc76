"""The CUDA kernels: built into the GPU op library whenever nvcc exists, and
checked against a host reference by the standalone harness on a GPU.

CI has nvcc but no GPU: there the build checks run and the harness run is
skipped (it needs a device); on a GPU machine it runs in full.
"""

import glob
import os
import shutil
import subprocess

import pytest
import tensorflow as tf

import tf_blocksparse as tfbs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
# The libraries of the package under test (in site-packages after `pip install .`).
OPS_DIR = os.path.dirname(tfbs.ops.__file__)


@needs_nvcc
def test_gpu_op_library_was_built_and_loads():
  libs = glob.glob(os.path.join(OPS_DIR, "_tf_blocksparse_ops_gpu*.so"))
  assert libs, "setup.py found nvcc but did not build the CUDA kernels"
  # Linked against the static CUDA runtime: loads on a machine without CUDA.
  tf.load_op_library(glob.glob(os.path.join(OPS_DIR, "_tf_blocksparse_ops.*so"))[0])
  tf.load_op_library(libs[0])


@needs_nvcc
def test_harness_builds_and_passes_on_a_gpu(tmp_path):
  binary = os.path.join(tmp_path, "harness")
  env = dict(os.environ, TFBS_HARNESS_BIN=binary, TFBS_CUDA_ARCH="sm_80")
  result = subprocess.run([os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=600)
  assert os.path.exists(binary), result.stderr
  if result.returncode == 3:
    pytest.skip("no CUDA device on this machine: " + result.stdout.strip())
  assert result.returncode == 0, result.stdout + result.stderr
  assert "PASS" in result.stdout and "FAIL" not in result.stdout
