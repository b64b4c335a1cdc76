"""Lazy loading of the compiled op library, with a pure-TF fallback switch.

`setup.py` builds `_tf_blocksparse_ops*.so` (CPU kernels, always) and
`_tf_blocksparse_ops_gpu*.so` (CUDA kernels, when nvcc was found) next to
this file. They are loaded on first use, not on import, so that importing
the package stays cheap and a broken build degrades to the fallback with one
warning instead of an ImportError.

A library is used only if it registers every op the wrappers call
(`EXPECTED_OPS`): an empty or partial build (e.g. compiled from a source
distribution that lacked the C++ sources) must not make
`custom_ops_available()` say True and then fail on the first op.
"""

import contextlib
import glob
import os
import sys
import threading
import warnings

import tensorflow as tf

DISABLE_ENV = "TF_BLOCKSPARSE_DISABLE_CUSTOM_OPS"
_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBRARY = "_tf_blocksparse_ops.*so"

# The Python names of the ops in ops/*_ops.cc (REGISTER_OP("TfbsBsrMatmul")
# is `tfbs_bsr_matmul`); tests/test_packaging.py checks that they match.
EXPECTED_OPS = (
    "tfbs_bsr_matmul",
    "tfbs_bsr_matmul_transposed",
    "tfbs_bsr_matmul_values_grad",
    "tfbs_kernel_info",
    "tfbs_set_kernel_isa",
    "tfbs_bsr_lstm_sequence",
    "tfbs_bsr_gru_sequence",
    "tfbs_bsr_simple_rnn_sequence",
)

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
    path = _find(_LIBRARY)
    if path is None:
      _state["error"] = _missing_library_reason()
      return None
    try:
      lib = tf.load_op_library(path)
    except (tf.errors.NotFoundError, OSError) as e:
      _state["error"] = (f"loading {path} failed: {e}. If it was built "
                         "against another TensorFlow, reinstall tf_blocksparse "
                         "so that it is compiled against this one")
      return None
    missing = [op for op in EXPECTED_OPS if not hasattr(lib, op)]
    if missing:
      _state["error"] = (
          f"{path} loads but lacks {len(missing)} of its {len(EXPECTED_OPS)} ops "
          f"({', '.join(missing)}): it was built from incomplete sources. "
          "Reinstall from the git repository or a complete source "
          "distribution (one with ops/*.cc)")
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


def _missing_library_reason():
  """Why no library is next to this file, and what to do about it."""
  package = os.path.dirname(_HERE)
  elsewhere = [
      os.path.join(entry, "tf_blocksparse")
      for entry in sys.path
      if entry and os.path.realpath(os.path.join(entry, "tf_blocksparse")) !=
      os.path.realpath(package) and glob.glob(
          os.path.join(entry, "tf_blocksparse", "ops", _LIBRARY))]
  in_source_tree = os.path.exists(os.path.join(package, os.pardir, "setup.py"))
  if elsewhere:
    return (f"tf_blocksparse was imported from {package}, which has no compiled "
            f"library, instead of the installed copy at {elsewhere[0]}, which "
            "has one: a source tree on sys.path shadows the installed "
            "package (`python -m ...`, `python -c` and the REPL put the current "
            "directory first). Run from another directory, or set "
            "PYTHONSAFEPATH=1 (Python 3.11+: the current directory is not put "
            "on sys.path), e.g. `PYTHONSAFEPATH=1 python -m pytest tests`; or "
            "install editable (`pip install -e .`), which builds the library "
            "into the source tree")
  if in_source_tree:
    return (f"the source tree at {package} has no compiled library "
            f"{_LIBRARY} in {_HERE}: build it there with `pip install -e .` "
            "(or `python setup.py build_ext --inplace`)")
  return (f"the compiled library {_LIBRARY} is not in {_HERE}: reinstall "
          "tf_blocksparse with pip (`pip install --force-reinstall --no-deps "
          "tf_blocksparse`, or `pip install .` from its source tree)")


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
  """True when the compiled op library is loaded, registers every op the
  package calls, and is not switched off; `load_error()` says why not."""
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
