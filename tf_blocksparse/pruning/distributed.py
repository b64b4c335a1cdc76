"""Variable updates that are correct under every `tf.distribute` strategy.

The pruning state (step, masks, thresholds, q) and the masked weights are
mirrored variables under `MirroredStrategy`/`MultiWorkerMirroredStrategy`.
Writing one from a replica needs a synchronisation point (`merge_call`),
which TF forbids inside `tf.cond` in a `tf.function`. So the wrapper makes
one `merge_call` per training call, outside any control flow, and does all
its writes in the cross-replica function: there the conditions are plain
`tf.cond`s and each write is a `strategy.extended.update`, which assigns
every local copy from values computed once (so the copies stay identical)
and moves no data between devices when the value is itself mirrored.

Without a strategy the same code runs with `strategy=None` and plain
assignments.
"""

import tensorflow as tf


def in_cross_replica(fn):
  """Calls `fn(strategy)` in cross-replica context and returns its result.

  `strategy` is None when no strategy is active. From a replica (inside
  `strategy.run`, `fit`) this is a `merge_call`, so it must not be called
  inside `tf.cond`/`tf.while_loop`.

  >>> import tensorflow as tf
  >>> v = tf.Variable(1.0)
  >>> _ = in_cross_replica(lambda strategy: assign(strategy, v, 3.0))
  >>> float(v.numpy())
  3.0
  """
  if not tf.distribute.has_strategy():
    return fn(None)
  context = tf.distribute.get_replica_context()
  if context is None:   # already cross-replica, e.g. a callback
    return fn(tf.distribute.get_strategy())
  return context.merge_call(fn)


def update(strategy, variable, fn, *args):
  """`fn(variable_copy, *args)` on every copy of `variable`.

  Mirrored `args` are split per device, other tensors are copied to each.
  Returns the results as a flat list, for `tf.control_dependencies`.
  """
  if strategy is None:
    result = fn(variable, *args)
  else:
    result = strategy.extended.update(variable, fn, args=args, group=False)
  return [r for r in tf.nest.flatten(result) if r is not None]


def assign(strategy, variable, value):
  return update(strategy, variable, lambda v, x: v.assign(x), value)
