"""What the README says about tf_keras, Keras 3 and `tf.keras` in one
process: each case runs in a new interpreter, since `tf.keras` is resolved
once per process."""

import json
import os
import subprocess
import sys
import textwrap

import tf_blocksparse as tfbs

PACKAGE_PARENT = os.path.dirname(os.path.dirname(tfbs.__file__))


def _run(code, **env):
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONSAFEPATH="1", **env)
  full_env.pop("TF_USE_LEGACY_KERAS", None)
  full_env["PYTHONPATH"] = os.pathsep.join(
      [PACKAGE_PARENT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_tf_blocksparse_first_makes_tf_keras_the_legacy_keras():
  result = _run("""
      import json, os, subprocess, sys
      import tf_blocksparse
      import tensorflow as tf
      child = subprocess.run([sys.executable, "-c",
                              "import os; print(os.environ.get('TF_USE_LEGACY_KERAS'))"],
                             capture_output=True, text=True).stdout.strip()
      print(json.dumps({"model": tf.keras.Model.__module__, "child": child}))
      """)
  assert result["model"].startswith("tf_keras.")
  assert result["child"] == "1"  # inherited by child processes


def test_touching_tf_keras_first_keeps_keras_3_and_tf_blocksparse_works():
  result = _run("""
      import json
      import numpy as np
      import tensorflow as tf
      tf.keras.Model
      import tf_blocksparse as tfbs, tf_keras
      keras3 = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(4)])
      try:
        tfbs.to_block_sparse(keras3)
        refused = ""
      except TypeError as e:
        refused = str(e)
      w = np.kron(np.eye(2), np.ones([4, 4])).astype(np.float32)
      dense = tf_keras.Sequential([tf_keras.Input((8,)), tf_keras.layers.Dense(8, use_bias=False)])
      dense.layers[0].kernel.assign(w)
      fast = tfbs.to_block_sparse(dense, block_size=4, min_sparsity=0.3)
      x = np.arange(16, dtype=np.float32).reshape(2, 8)
      print(json.dumps({"model": tf.keras.Model.__module__, "refused": refused,
                        "layer": type(fast.layers[0]).__name__,
                        "err": float(np.abs(fast(x).numpy() - x @ w).max())}))
      """)
  assert result["model"].startswith("keras.")
  assert "takes a tf_keras Model" in result["refused"]
  assert result["layer"] == "BlockSparseDense"
  assert result["err"] < 1e-5
