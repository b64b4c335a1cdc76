"""Run-time choice of the CPU instruction set of the compiled kernels."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs

NEEDS = {
    "avx2": {"avx2", "fma", "bmi1", "bmi2", "f16c", "popcnt"},
    "avx512": {"avx2", "fma", "bmi1", "bmi2", "f16c", "popcnt", "avx512f",
               "avx512bw", "avx512vl", "avx512dq"},
}

pytestmark = pytest.mark.skipif(not tfbs.ops.custom_ops_available(),
                                reason="the compiled ops are not built")


def _cpuinfo_flags():
  """The kernel's own view of the CPU (Linux), independent of our CPUID code."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return None


def test_dispatch_picks_the_widest_isa_the_cpu_has():
  info = tfbs.ops.kernel_info()
  flags = _cpuinfo_flags()
  if flags is None or "avx" not in flags and "sse4_2" not in flags:
    pytest.skip("not an x86 Linux machine: only the baseline is built")
  expected = ["baseline"] + [isa for isa in ("avx2", "avx512") if NEEDS[isa] <= flags]
  assert info["supported"] == expected
  assert info["isa"] == expected[-1]
  assert info["reason"] == "widest ISA this CPU supports"
  for isa in ("avx2", "avx512"):
    if isa not in expected:
      assert info["missing"][isa]


def test_unknown_isa_is_rejected_by_name():
  with pytest.raises(tf.errors.InvalidArgumentError, match="'sse9' is not an ISA"):
    tfbs.ops.set_kernel_isa("sse9")
  assert tfbs.ops.kernel_info()["isa"] == tfbs.ops.kernel_info()["supported"][-1]


def test_every_forced_isa_gives_the_same_products():
  rng = np.random.default_rng(3)
  w = rng.standard_normal([96, 80]).astype(np.float32)
  w *= np.kron(rng.random([6, 5]) < 0.5, np.ones([16, 16]))
  m = tfbs.BlockSparseMatrix.from_dense(w, 16)
  x = rng.standard_normal([40, 96]).astype(np.float32)
  for isa in tfbs.ops.kernel_info()["supported"]:
    assert tfbs.ops.set_kernel_isa(isa)["isa"] == isa
    try:
      np.testing.assert_allclose(tfbs.ops.bsr_matmul(x, m), x @ w, rtol=1e-4, atol=1e-4)
    finally:
      tfbs.ops.set_kernel_isa("auto")


def _run(env, code):
  full_env = dict(os.environ, **env)
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_forcing_an_isa_the_cpu_lacks_names_what_is_missing():
  if "avx512" not in tfbs.ops.kernel_info()["built"]:
    pytest.skip("an x86-64 build is needed")
  # Hiding avx512bw makes this CPU look like one without AVX-512 for the
  # dispatch (as on an AVX2-only machine).
  result = _run({"TF_BLOCKSPARSE_HIDE_CPU_FEATURES": "avx512bw",
                 "TF_BLOCKSPARSE_ISA": "avx512"}, """
      import json, numpy as np, tensorflow as tf, tf_blocksparse as tfbs
      info = tfbs.ops.kernel_info()
      m = tfbs.BlockSparseMatrix.from_dense(np.eye(8, dtype=np.float32), 4)
      try:
        tfbs.ops.bsr_matmul(tf.ones([2, 8]), m)
        op_error = None
      except tf.errors.FailedPreconditionError as e:
        op_error = e.message
      try:
        tfbs.ops.set_kernel_isa("avx512")
        set_error = None
      except tf.errors.InvalidArgumentError as e:
        set_error = e.message
      auto = tfbs.ops.set_kernel_isa("auto")["isa"]
      y = tfbs.ops.bsr_matmul(tf.ones([2, 8]), m).numpy().tolist()
      print(json.dumps({"info": info, "op_error": op_error,
                        "set_error": set_error, "auto": auto, "y": y}))
  """)
  assert result["info"]["isa"] is None
  assert "lacks avx512bw" in result["info"]["error"]
  assert "TF_BLOCKSPARSE_ISA = 'avx512'" in result["op_error"]
  assert "lacks avx512bw" in result["op_error"]
  assert "lacks avx512bw" in result["set_error"]
  expected_auto = "avx2" if "avx2" in tfbs.ops.kernel_info()["supported"] else "baseline"
  assert result["auto"] == expected_auto
  assert result["y"] == np.ones([2, 8]).tolist()
