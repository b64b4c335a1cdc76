"""Timing of TensorFlow callables inside one graph, for benchmarks and demos.

Timing ops one eager call at a time measures Python dispatch (~50-100 us a
call), which hides a sparse kernel that itself takes tens of microseconds.
Here the callable runs `reps` times in a `tf.range` loop inside one
`tf.function`; its input changes with the loop counter (through a variable,
so nothing is loop invariant or constant folded), and the loop's own cost
is measured the same way with an identity and can be subtracted.

For side-by-side comparisons, `in_graph_timer` and `per_call_timer` prepare
timers once and `interleaved_medians` runs them in turns (medians over
rounds, so drift in the machine's load lands on all alike);
`machine_meta()` describes the CPU, TF and our kernels for a result file.
"""

import datetime
import os
import platform
import time

import numpy as np
import tensorflow as tf

from tf_blocksparse.ops import _loader


def time_in_graph(fn, x, budget_s=0.15, custom_ops=True, repeats=3):
  """Milliseconds per call of `fn(x)`: best of `repeats` loops of ~budget_s.

  `fn` must return a tensor of rank >= 1 (one element of it feeds the loop's
  accumulator, so the call cannot be pruned). `custom_ops=False` traces it
  with the pure-TF fallback of the tf_blocksparse ops.
  """
  timer = in_graph_timer(fn, x, budget_s, custom_ops)
  return min(timer() for _ in range(repeats))


def loop_overhead_ms(x, budget_s=0.15):
  """The per-iteration cost of `time_in_graph`'s loop itself, in ms."""
  return time_in_graph(tf.identity, x, budget_s)


# --- Interleaved timing --------------------------------------------------
# `time_in_graph` takes the best of back-to-back loops of one callable. On a
# shared machine the load drifts over seconds, so two callables timed one
# after the other can see different machines. The timers below are
# prepared once (traced, calibrated) and then take turns, round after
# round; medians over the rounds compare them under the same drift.


def in_graph_timer(fn, x, budget_s=0.15, custom_ops=True):
  """A prepared `time_in_graph` loop: each call times one loop, in ms a call.

  Traces and calibrates on creation; the returned zero-argument callable
  gives the raw time per call of `fn(x)` (the loop's own cost included:
  subtract a timer of `tf.identity`, as `loop_overhead_ms` does).
  """
  x = tf.convert_to_tensor(x)
  eps = tf.Variable(tf.zeros([], x.dtype))

  @tf.function
  def loop(reps):
    acc = tf.zeros([], x.dtype)
    for i in tf.range(reps):
      y = fn(x + tf.cast(i, x.dtype) * eps)
      acc += tf.reshape(y, [-1])[0]
    return acc

  def seconds(reps):
    start = time.perf_counter()
    loop(tf.constant(reps)).numpy()
    return time.perf_counter() - start

  # The path (compiled or fallback) is fixed when the loop is traced.
  with _loader.use_custom_ops(custom_ops):
    seconds(1)
  per_call = max(seconds(2) / 2, 1e-5)
  reps = int(np.clip(budget_s / per_call, 1, 5000))
  return lambda: seconds(reps) / reps * 1e3


def per_call_timer(fn, *args, budget_s=0.1):
  """Times `fn(*args)` called from a Python loop: ms a call, dispatch included.

  For what a user sees per call: an eager op, a `tf.function` (called with
  the same arguments, so it is traced once) or any other framework's call.
  The result of the last call is materialised so nothing is left running.
  """
  def seconds(reps):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    _materialise(out)
    return time.perf_counter() - start

  seconds(1)  # trace and warm up
  per_call = max(seconds(3) / 3, 1e-6)
  reps = int(np.clip(budget_s / per_call, 1, 20000))
  return lambda: seconds(reps) / reps * 1e3


def _materialise(out):
  if hasattr(out, "numpy"):
    out.numpy()


def interleaved_medians(timers, repeats=5):
  """Runs prepared timers in turns; returns ({name: median}, {name: samples}).

  `timers` maps names to zero-argument callables returning a time (as
  `in_graph_timer` and `per_call_timer` make). Each of `repeats` rounds
  runs every timer once, the order rotated by one each round so that no
  timer always runs right after the same other one.
  """
  names = list(timers)
  samples = {name: [] for name in names}
  for r in range(repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      samples[name].append(float(timers[name]()))
  medians = {name: float(np.median(v)) for name, v in samples.items()}
  return medians, samples


# --- Machine description -------------------------------------------------
# The kernels dispatch on the CPU's instruction sets, so a number without
# the CPU and the ISA chosen cannot be compared with another machine's.

CPU_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
             "avx512dq", "avx512_bf16", "amx_tile", "amx_bf16")
ISA_ENV = "TF_BLOCKSPARSE_ISA"


def cpu_info(path="/proc/cpuinfo"):
  """Model name, the flags in CPU_FLAGS and core counts of the first CPU."""
  fields = {}
  try:
    with open(path) as f:
      for line in f:
        if not line.strip():
          break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  flags = set(fields.get("flags", "").split())
  # A hypervisor may report only "AMD EPYC": vendor, family, model and
  # stepping still tell one generation from the next (Zen 4 is family 25,
  # Zen 5 family 26).
  return {"cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
          "cpu_vendor": fields.get("vendor_id"),
          "cpu_family": _int_or_none(fields.get("cpu family")),
          "cpu_model_number": _int_or_none(fields.get("model")),
          "cpu_stepping": _int_or_none(fields.get("stepping")),
          "cpu_flags": {f: f in flags for f in CPU_FLAGS},
          "cpu_cores_per_socket": _int_or_none(fields.get("cpu cores")),
          "cpus": os.cpu_count(),
          "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count()}


def _int_or_none(text):
  try:
    return int(text)
  except (TypeError, ValueError):
    return None


def machine_meta():
  """What a benchmark's JSON needs to be read later: CPU, TF, our kernels."""
  from tf_blocksparse import ops  # pylint: disable=import-outside-toplevel
  library = _loader._find("_tf_blocksparse_ops.*so")  # pylint: disable=protected-access
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          **cpu_info(), "tensorflow": tf.__version__,
          "custom_ops": ops.custom_ops_available(), "op_library": library,
          ISA_ENV: os.environ.get(ISA_ENV)}
  # kernel_info() (the ISA the kernels chose, and why) is newer than some
  # builds this is run against.
  if hasattr(ops, "kernel_info"):
    try:
      meta["kernel_info"] = ops.kernel_info()
    except Exception as e:  # pylint: disable=broad-except
      meta["kernel_info"] = {"error": repr(e)}
  return meta
