"""Graph-side pruning logic of one wrapper: updating and applying masks.

`BlockPruning` plays the part of tfmot's `pruning_impl.Pruning` (same
`weight_mask_op()` / `conditional_mask_update()` methods), so tfmot's
`UpdatePruningStep` can drive it, but its masks are block masks computed per
gate slice by `block_masks`.
"""

import collections

import tensorflow as tf

from tf_blocksparse.pruning import block_masks

# The variables kept for one prunable weight.
MaskedWeight = collections.namedtuple(
    "MaskedWeight", ["path", "weight", "gates", "mask", "threshold", "q"])


class BlockPruning:
  """Updates and applies the block masks of a list of `MaskedWeight`s.

  Args:
    masked_weights: list of `MaskedWeight`.
    step_fn: callable returning the current pruning step (int64 tensor).
    schedule: a `schedules.BlockSchedule`.
    block_size: `(bh, bw)`.
    pooling: block representative, see `block_masks.representatives`.
  """

  def __init__(self, masked_weights, step_fn, schedule, block_size, pooling):
    self.masked_weights = list(masked_weights)
    self._step_fn = step_fn
    self._schedule = schedule
    self._block_size = block_size
    self._pooling = pooling

  def _matrix(self, tensor):
    return tf.reshape(tensor, block_masks.matrix_shape(tensor.shape))

  def block_mask(self, mw):
    """Current bool block mask `[gates, nbr, nbc]` of one weight."""
    return block_masks.from_element_mask(
        self._matrix(mw.mask), self._block_size, mw.gates)

  def _new_mask(self, mw, step):
    weight = tf.convert_to_tensor(mw.weight)
    matrix = self._matrix(tf.cast(weight, mw.mask.dtype))
    reps = block_masks.representatives(matrix, self._block_size,
                                       self._pooling, mw.gates)
    kept_before = self.block_mask(mw)
    updates = []
    if self._schedule.mode == "sparsity":
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
      updates.append(mw.q.assign(q))
      threshold = schedule.threshold(step, q, self._block_size)
      kept = block_masks.keep_above_threshold(reps, threshold, kept_before)
    element_mask = block_masks.expand(tf.cast(kept, mw.mask.dtype),
                                      matrix.shape, self._block_size)
    updates.append(mw.mask.assign(tf.reshape(element_mask, mw.mask.shape)))
    updates.append(mw.threshold.assign(tf.cast(threshold, mw.threshold.dtype)))
    return updates

  def conditional_mask_update(self):
    """Recomputes the masks when the schedule says so at this step."""
    step = self._step_fn()

    def update():
      ops = []
      for mw in self.masked_weights:
        ops += self._new_mask(mw, step)
      with tf.control_dependencies(ops):
        return tf.constant(True)

    def no_update():
      return tf.constant(False)

    return tf.cond(self._schedule.should_prune(step), update, no_update)

  def weight_mask_op(self):
    """Sets every pruned weight to weight * mask."""
    return tf.group([
        mw.weight.assign(mw.weight * tf.cast(mw.mask, mw.weight.dtype))
        for mw in self.masked_weights])

  def group_lasso(self):
    """Σ over weights and blocks of the block L2 norms (a scalar)."""
    total = tf.constant(0.0)
    for mw in self.masked_weights:
      matrix = self._matrix(tf.cast(tf.convert_to_tensor(mw.weight),
                                    tf.float32))
      total += tf.reduce_sum(block_masks.block_l2_norms(
          matrix, self._block_size, mw.gates))
    return total
