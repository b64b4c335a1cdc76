"""Graph-side pruning logic of one wrapper: updating and applying masks.

`BlockPruning` plays the part of tfmot's `pruning_impl.Pruning` (same
`weight_mask_op()` / `conditional_mask_update()` methods), so tfmot's
`UpdatePruningStep` can drive it, but its masks are block masks computed per
gate slice by `block_masks`. Every write goes through `distributed`, so the
same code runs with no strategy and under `tf.distribute`: masks are
computed once per update from one copy of the weights and assigned to every
copy, and the step advances once per global step.
"""

import collections

import tensorflow as tf

from tf_blocksparse.pruning import block_masks
from tf_blocksparse.pruning import checks
from tf_blocksparse.pruning import distributed

# The variables kept for one prunable weight; `row_axes` gives its matrix
# view (`block_masks.matrix_shape`).
MaskedWeight = collections.namedtuple(
    "MaskedWeight",
    ["path", "weight", "gates", "mask", "threshold", "q", "row_axes"],
    defaults=(None,))

_MISSING_CALLBACK = (
    "Block pruning needs the tf_blocksparse.UpdatePruningStep (or tfmot's) "
    "callback during training: model.fit(..., callbacks=["
    "tfbs.UpdatePruningStep()]).")


def matrix_view(tensor, mw):
  """`tensor` (shaped like `mw.weight`) as its `[K, N]` matrix."""
  return tf.reshape(tensor, block_masks.matrix_shape(tensor.shape,
                                                     mw.row_axes))


def m_by_n_segment(mw, block_size):
  """Block rows per input-channel run of `mw` for M-by-N groups."""
  shape = [int(d) for d in mw.weight.shape]
  k, _ = block_masks.matrix_shape(shape, mw.row_axes)
  rows = shape[-2] if mw.row_axes is None and len(shape) > 2 else k
  if rows == k:
    return None
  if rows % block_size[0]:
    raise ValueError(
        f"sparsity_m_by_n groups blocks along the input channels of "
        f"'{mw.path}' (shape {shape}: runs of {rows} rows), which block "
        f"height {block_size[0]} does not divide; use a block height that "
        f"divides {rows}.")
  return rows // block_size[0]


class BlockPruning:
  """Updates and applies the block masks of a list of `MaskedWeight`s.

  Args:
    masked_weights: list of `MaskedWeight`.
    step: the int64 pruning-step variable (or a callable returning it).
    schedule: a `schedules.BlockSchedule`.
    block_size: `(bh, bw)`.
    pooling: block representative, see `block_masks.representatives`.
    m_by_n: `(m, n)` to prune m of every n blocks along the input axis
      instead of following the schedule's sparsity, or None.
  """

  def __init__(self, masked_weights, step, schedule, block_size, pooling,
               m_by_n=None):
    self.masked_weights = list(masked_weights)
    self._step = step
    self._schedule = schedule
    self._block_size = block_size
    self._pooling = pooling
    self._m_by_n = m_by_n
    if m_by_n is not None:
      self._segments = [m_by_n_segment(mw, block_size)
                        for mw in self.masked_weights]

  @property
  def step(self):
    return self._step() if callable(self._step) else self._step

  def block_mask(self, mw):
    """Current bool block mask `[gates, nbr, nbc]` of one weight."""
    return block_masks.from_element_mask(
        matrix_view(mw.mask, mw), self._block_size, mw.gates)

  def _new_mask(self, i, mw, step):
    """`(mask, threshold, q or None)` of one weight at `step`."""
    weight = tf.convert_to_tensor(mw.weight)
    matrix = matrix_view(tf.cast(weight, mw.mask.dtype), mw)
    reps = block_masks.representatives(matrix, self._block_size,
                                       self._pooling, mw.gates)
    kept_before = self.block_mask(mw)
    q = None
    if self._m_by_n is not None:
      kept, threshold = block_masks.keep_m_by_n(
          reps, self._m_by_n, kept_before, self._segments[i])
    elif self._schedule.mode == "sparsity":
      kept, threshold = block_masks.keep_top_blocks(
          reps, self._schedule.sparsity(step), kept_before)
    else:
      schedule = self._schedule.schedule
      if schedule.q is not None:
        q = tf.constant(schedule.q, mw.q.dtype)
      elif schedule.target_sparsity is not None:
        # Re-measured at every update, so the threshold follows the kept
        # weights as they grow; pruned blocks count as zeros.
        q = schedule.measure_q(tf.abs(matrix), reps)
      else:
        # q is fixed once, from the weight as pruning starts, and saved; the
        # percentile's sort runs only that once.
        q = tf.cond(mw.q < 0,
                    lambda: schedule.measure_q(tf.abs(matrix), reps),
                    lambda: tf.convert_to_tensor(mw.q))
      threshold = schedule.threshold(step, q, self._block_size)
      kept = block_masks.keep_above_threshold(reps, threshold, kept_before)
    element_mask = block_masks.expand(tf.cast(kept, mw.mask.dtype),
                                      matrix.shape, self._block_size)
    return (tf.reshape(element_mask, mw.mask.shape),
            tf.cast(threshold, mw.threshold.dtype), q)

  def _should_update(self, step):
    if self._m_by_n is None:
      return self._schedule.should_prune(step)
    # M-by-N masks do not depend on the sparsity: set once, when the
    # schedule starts (at the first step at the earliest), as tfmot does.
    first, _ = self._schedule.window()
    return tf.equal(tf.cast(step, tf.int64), max(1, first))

  def _maybe_update(self, strategy, step):
    """In cross-replica context: the masks' update at `step`, if due."""

    def update():
      ops = []
      for i, mw in enumerate(self.masked_weights):
        mask, threshold, q = self._new_mask(i, mw, step)
        if q is not None:
          ops += distributed.assign(strategy, mw.q, q)
        ops += distributed.assign(strategy, mw.mask, mask)
        ops += distributed.assign(strategy, mw.threshold, threshold)
      with tf.control_dependencies(ops):
        return tf.constant(True)

    return tf.cond(self._should_update(step), update,
                   lambda: tf.constant(False))

  def _apply(self, strategy):
    """In cross-replica context: weight <- weight * mask on every copy."""
    ops = []
    for mw in self.masked_weights:
      ops += distributed.update(
          strategy, mw.weight,
          lambda w, m: w.assign(w * tf.cast(m, w.dtype)), mw.mask)
    return tf.group(ops)

  def training_call(self, training):
    """What a wrapper does on each call, in one synchronisation point.

    When `training`: advances the step (once per global step, not per
    replica), checks that the callback set it, and updates the masks when
    due. Always: applies the masks. Call it from replica context outside
    any `tf.cond`.
    """

    def cross_replica(strategy):
      def on_training():
        ops = distributed.update(strategy, self.step,
                                 lambda v: v.assign_add(1))
        with tf.control_dependencies(ops):
          step = tf.identity(tf.convert_to_tensor(self.step))
          check = tf.debugging.assert_greater_equal(
              step, tf.constant(1, tf.int64), message=_MISSING_CALLBACK)
        with tf.control_dependencies([check]):
          return self._maybe_update(strategy, tf.identity(step))

      updated = checks.smart_cond(training, on_training,
                                  lambda: tf.constant(False))
      with tf.control_dependencies([updated]):
        return self._apply(strategy)

    return distributed.in_cross_replica(cross_replica)

  def conditional_mask_update(self):
    """Recomputes the masks when the schedule says so at this step."""
    return distributed.in_cross_replica(
        lambda strategy: self._maybe_update(
            strategy, tf.convert_to_tensor(self.step)))

  def weight_mask_op(self):
    """Sets every pruned weight to weight * mask."""
    return distributed.in_cross_replica(self._apply)

  def group_lasso(self):
    """Σ over weights and blocks of the block L2 norms (a scalar)."""
    total = tf.constant(0.0)
    for mw in self.masked_weights:
      matrix = matrix_view(tf.cast(tf.convert_to_tensor(mw.weight),
                                   tf.float32), mw)
      total += tf.reduce_sum(block_masks.block_l2_norms(
          matrix, self._block_size, mw.gates))
    return total
