"""Timing of TensorFlow callables inside one graph, for benchmarks and demos.

Timing ops one eager call at a time measures Python dispatch (~50-100 us a
call), which hides a sparse kernel that itself takes tens of microseconds.
Here the callable runs `reps` times in a `tf.range` loop inside one
`tf.function`; its input changes with the loop counter (through a variable,
so nothing is loop invariant or constant folded), and the loop's own cost
is measured the same way with an identity and can be subtracted.
"""

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

  with _loader.use_custom_ops(custom_ops):
    seconds(1)  # trace and warm up
    per_call = max(seconds(2) / 2, 1e-5)
    reps = int(np.clip(budget_s / per_call, 1, 5000))
    best = min(seconds(reps) for _ in range(repeats))
  return best / reps * 1e3


def loop_overhead_ms(x, budget_s=0.15):
  """The per-iteration cost of `time_in_graph`'s loop itself, in ms."""
  return time_in_graph(tf.identity, x, budget_s)
