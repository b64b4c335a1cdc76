"""Lazy loading of the compiled op library, with a pure-TF fallback switch.

`setup.py` builds `_tf_blocksparse_ops*.so` (CPU kernels, always) and
`_tf_blocksparse_ops_gpu*.so` (CUDA kernels, when nvcc was found) next to
this file. They are loaded on first use, not on import, so that importing
the package stays cheap and a broken build degrades to the fallback with one
warning instead of an ImportError.
"""

import contextlib
import glob
import os
import threading
import warnings

import tensorflow as tf

DISABLE_ENV = "TF_BLOCKSPARSE_DISABLE_CUSTOM_OPS"
_HERE = os.path.dirname(os.path.abspath(__file__))

_lock = threading.Lock()
_state = {"loaded": False, "lib": None, "error": None, "warned": False}
_override = threading.local()


def _find(pattern):
  paths = sorted(glob.glob(os.path.join(_HERE, pattern)))
  return paths[0] if paths else None


def _load():
  with _lock:
    if _state["loaded"]:
      return _state["lib"]
    _state["loaded"] = True
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
      _state["error"] = f"disabled by {DISABLE_ENV}"
      return None
    path = _find("_tf_blocksparse_ops.*so") or _find("_tf_blocksparse_ops.so")
    if path is None:
      _state["error"] = ("the compiled library _tf_blocksparse_ops*.so is not "
                         f"in {_HERE}; reinstall with "
                         "`pip install --no-build-isolation .`")
      return None
    try:
      lib = tf.load_op_library(path)
    except (tf.errors.NotFoundError, OSError) as e:
      _state["error"] = f"loading {path} failed: {e}"
      return None
    gpu_path = _find("_tf_blocksparse_ops_gpu*.so")
    if gpu_path and tf.config.list_physical_devices("GPU"):
      try:
        tf.load_op_library(gpu_path)
      except (tf.errors.NotFoundError, OSError) as e:
        warnings.warn(f"tf_blocksparse: CUDA kernels not loaded ({e}); "
                      "GPU inputs are copied to the CPU kernels.")
    _state["lib"] = lib
    return lib


def library():
  """The loaded op module, or None (pure-TF fallback).

  Honors `use_custom_ops(False)` and warns once per process when the
  library is missing.
  """
  if getattr(_override, "enabled", True) is False:
    return None
  lib = _load()
  if lib is None and not _state["warned"] and _state["error"] != f"disabled by {DISABLE_ENV}":
    _state["warned"] = True
    warnings.warn("tf_blocksparse: custom ops unavailable, using the pure-TF "
                  f"implementation (slower): {_state['error']}", RuntimeWarning)
  return lib


def custom_ops_available():
  """True when the compiled op library is loaded (and not switched off)."""
  return _load() is not None and getattr(_override, "enabled", True) is not False


def load_error():
  """Why the library is not loaded (None when it is)."""
  _load()
  return _state["error"]


@contextlib.contextmanager
def use_custom_ops(enabled):
  """Within the block, use (True) or bypass (False) the compiled ops.

  Decided when a function is traced: a `tf.function` traced inside the block
  keeps the path it was traced with.
  """
  previous = getattr(_override, "enabled", True)
  _override.enabled = bool(enabled)
  try:
    yield
  finally:
    _override.enabled = previous
