"""Which CPU instruction set the compiled kernels use, and forcing one.

The op library holds the CPU arithmetic once per instruction set (portable
x86-64-v2 baseline, AVX2+FMA, AVX-512) and takes the widest one the CPU and
OS support, at run time. `TF_BLOCKSPARSE_ISA=baseline|avx2|avx512|auto` in
the environment, or `set_kernel_isa`, forces one for the whole process.
"""

import json

import tensorflow as tf

from tf_blocksparse.ops import _loader

ISAS = ("baseline", "avx2", "avx512")


def kernel_info():
  """What the compiled CPU kernels run on, as a dict.

  Keys: `isa` (the ISA in use, or None when a forced one cannot run here),
  `reason`, `error`, `built` and `supported` (ISA names), `missing` (what
  the CPU lacks for each unsupported ISA), `cpu_features`, and
  `custom_ops` (False, with `load_error`, when the fallback is in use).

  Example:

  >>> import tf_blocksparse as tfbs
  >>> info = tfbs.ops.kernel_info()
  >>> info["custom_ops"] is False or info["isa"] in info["supported"]
  True
  """
  lib = _loader._load()
  if lib is None:
    return {"custom_ops": False, "load_error": _loader.load_error(), "isa": None}
  info = json.loads(lib.tfbs_kernel_info().numpy().decode())
  info["custom_ops"] = True
  return info


def set_kernel_isa(isa):
  """Forces the CPU kernels' ISA for the process; `"auto"` undoes it.

  Args:
    isa: one of "baseline", "avx2", "avx512", "auto".

  Returns:
    `kernel_info()` after the change.

  Raises:
    tf.errors.InvalidArgumentError: an unknown name, or an ISA this CPU
      cannot run (the message names the missing features).
    tf.errors.FailedPreconditionError: the compiled ops are not loaded.
  """
  lib = _loader._load()
  if lib is None:
    raise tf.errors.FailedPreconditionError(
        None, None, "the compiled ops are not loaded, so there is no ISA to "
        f"choose ({_loader.load_error()})")
  with tf.init_scope():  # eager even when called while tracing
    lib.tfbs_set_kernel_isa(tf.constant(str(isa)))
  return kernel_info()
