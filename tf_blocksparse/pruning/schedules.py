"""When to prune and how much: the paper's threshold schedule and adapters.

Two modes reach the wrapper:
- sparsity-target mode: any `tfmot.sparsity.keras.PruningSchedule`
  (`ConstantSparsity`, `PolynomialDecay`, your own) gives, at a step, whether
  to update the masks and the fraction of blocks to prune; the wrapper keeps
  the blocks with the largest representatives.
- threshold mode: `GradualThreshold` gives a threshold ε(step); blocks whose
  representative is below it are pruned (Narang et al. 2017, "Block-Sparse
  Recurrent Neural Networks").

`as_block_schedule` turns either into a `BlockSchedule` the wrapper uses.
"""

import numpy as np
import tensorflow as tf
import tf_keras
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_schedule as tfmot_schedule)

from tf_blocksparse.pruning import block_masks

ConstantSparsity = tfmot_schedule.ConstantSparsity
PolynomialDecay = tfmot_schedule.PolynomialDecay
PruningSchedule = tfmot_schedule.PruningSchedule


def _check_int(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)


def _check_positive(name, value):
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{name} must be a positive number or None, got "
                     f"{value!r}.")
  if not value > 0:
    raise ValueError(f"{name} must be positive, got {value}.")
  return float(value)


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class GradualThreshold:
  """The threshold schedule of Narang et al. (2017), for blocks.

  Masks are updated every `frequency` steps of `[start_step, end_step]`;
  a block is pruned when its representative is below ε(step), and pruned
  blocks never come back. With

      θ = 2·q·freq / (2·(ramp − start) + 3·(end − ramp))   (start_slope)
      φ = 1.5·θ                                           (ramp_slope)

  the threshold rises linearly, faster after `ramp_step`:

      start ≤ step < ramp:  ε = θ·(step − start + 1) / freq
      ramp ≤ step ≤ end:    ε = (θ·(ramp − start + 1)
                                 + φ·(step − ramp + 1)) / freq

  which brings it to about `q` at `end_step`. `q` defaults to the 90th
  percentile of |w| of each weight when pruning starts. For `bh x bw` blocks
  both slopes are multiplied by `(bh·bw)^(1/4)`, as in the paper;
  `start_slope`/`ramp_slope`, when given, are the element-wise slopes before
  that scaling. Before `start_step` ε is 0; after `end_step` it stays at
  ε(end_step).

  The paper tunes q per model to reach a sparsity. `target_sparsity` does
  that tuning from the weights: at every mask update q of each weight is
  the `target_sparsity` quantile of its current block representatives
  (pruned blocks counting as zeros), with no block scaling, since the
  representatives are already block maxima. A q fixed when pruning starts
  falls behind, since the kept weights grow while training (a run meant
  for 90 % stopped at 67 %); re-measured, ε still rises on the paper's two
  slopes, as a fraction of q, and the final update prunes the blocks below
  about the target quantile, so the sparsity lands near the target.

  Example:

  >>> s = GradualThreshold(start_step=0, ramp_step=20, end_step=40,
  ...                      frequency=10)
  >>> # θ = 2·1·10 / (2·20 + 3·20) = 0.2, φ = 0.3
  >>> round(float(s.threshold(20, q=1.0)), 6)    # (0.2·21 + 0.3·1) / 10
  0.45
  """

  def __init__(self, start_step, ramp_step, end_step, frequency=100,
               start_slope=None, ramp_slope=None, q=None,
               target_sparsity=None):
    self.start_step = _check_int("start_step", start_step, 0)
    self.ramp_step = _check_int("ramp_step", ramp_step, 0)
    self.end_step = _check_int("end_step", end_step, 0)
    self.frequency = _check_int("frequency", frequency, 1)
    if self.end_step <= self.start_step:
      raise ValueError(f"end_step ({end_step}) must be greater than "
                       f"start_step ({start_step}).")
    if not self.start_step <= self.ramp_step <= self.end_step:
      raise ValueError(f"ramp_step ({ramp_step}) must lie in [start_step, "
                       f"end_step] = [{start_step}, {end_step}].")
    self.start_slope = _check_positive("start_slope", start_slope)
    self.ramp_slope = _check_positive("ramp_slope", ramp_slope)
    self.q = _check_positive("q", q)
    if target_sparsity is not None:
      if isinstance(target_sparsity, bool) or not isinstance(
          target_sparsity, (int, float, np.number)) or not (
              0 < target_sparsity < 1):
        raise ValueError(f"target_sparsity must be a number in (0, 1), got "
                         f"{target_sparsity!r}.")
      if q is not None or start_slope is not None:
        raise ValueError("target_sparsity chooses q from the weights; give "
                         "either target_sparsity or q/start_slope, not both.")
      target_sparsity = float(target_sparsity)
    self.target_sparsity = target_sparsity

  def measure_q(self, magnitudes, representatives):
    """q of one weight when `q` was not given: fixed when pruning starts,
    or re-measured at each update with `target_sparsity`.

    Args:
      magnitudes: |w| of the weight.
      representatives: its block representatives.
    """
    if self.target_sparsity is not None:
      return block_masks.percentile(representatives,
                                    100.0 * self.target_sparsity)
    return block_masks.percentile(magnitudes, 90.0)

  def should_prune(self, step):
    """Whether masks are updated at `step` (a bool tensor)."""
    step = tf.cast(step, tf.int64)
    in_range = tf.logical_and(step >= self.start_step, step <= self.end_step)
    on_turn = tf.equal(tf.math.floormod(step - self.start_step,
                                        self.frequency), 0)
    return tf.logical_and(in_range, on_turn)

  def slopes(self, q, block_size=(1, 1)):
    """`(θ, φ)` for a given `q`, scaled for `block_size`."""
    q = tf.cast(q, tf.float32)
    start, ramp, end = self.start_step, self.ramp_step, self.end_step
    if self.start_slope is None:
      theta = 2.0 * q * self.frequency / (2.0 * (ramp - start) +
                                          3.0 * (end - ramp))
    else:
      theta = tf.constant(self.start_slope, tf.float32)
    phi = 1.5 * theta if self.ramp_slope is None else tf.constant(
        self.ramp_slope, tf.float32)
    if self.target_sparsity is not None:
      # q is already measured on block representatives.
      return theta, phi
    scale = float(block_size[0] * block_size[1]) ** 0.25
    return theta * scale, phi * scale

  def threshold(self, step, q=None, block_size=(1, 1)):
    """ε at `step` for a weight whose `q` is given (float32 tensor).

    `q` may be omitted when the schedule was given one or a `start_slope`.
    """
    if q is None:
      q = self.q
    if q is None and self.start_slope is None:
      raise ValueError("threshold() needs q: this schedule was built "
                       "without q or start_slope.")
    theta, phi = self.slopes(1.0 if q is None else q, block_size)
    start, ramp = float(self.start_step), float(self.ramp_step)
    s = tf.minimum(tf.cast(step, tf.float32), float(self.end_step))
    before_ramp = theta * (s - start + 1.0) / self.frequency
    after_ramp = (theta * (ramp - start + 1.0) +
                  phi * (s - ramp + 1.0)) / self.frequency
    eps = tf.where(s < ramp, before_ramp, after_ramp)
    return tf.where(s < start, tf.zeros_like(eps), eps)

  def pruning_window(self):
    """`(first, last)` step of pruning."""
    return self.start_step, self.end_step

  def get_config(self):
    return {"start_step": self.start_step, "ramp_step": self.ramp_step,
            "end_step": self.end_step, "frequency": self.frequency,
            "start_slope": self.start_slope, "ramp_slope": self.ramp_slope,
            "q": self.q, "target_sparsity": self.target_sparsity}

  @classmethod
  def from_config(cls, config):
    return cls(**config)

  def __eq__(self, other):
    return type(other) is type(self) and other.get_config() == self.get_config()

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
    return f"GradualThreshold({args})"


class BlockSchedule:
  """What the wrapper needs from a schedule, in either mode."""

  def __init__(self, schedule):
    self.schedule = schedule
    self.mode = ("threshold" if isinstance(schedule, GradualThreshold)
                 else "sparsity")

  def should_prune(self, step):
    if self.mode == "threshold":
      return self.schedule.should_prune(step)
    return tf.cast(self.schedule(step)[0], tf.bool)

  def sparsity(self, step):
    return self.schedule(step)[1]

  def window(self):
    """`(first, last)` step of pruning; last -1 means it never stops."""
    return pruning_window(self.schedule)

  def is_pruning(self, step):
    """True while the schedule is in its pruning window (bool tensor)."""
    first, last = pruning_window(self.schedule)
    step = tf.cast(step, tf.int64)
    after_first = step >= first
    if last < 0:  # tfmot's "prune forever"
      return after_first
    return tf.logical_and(after_first, step <= last)


def pruning_window(schedule):
  """`(begin, end)` of a schedule; end -1 means it never stops."""
  if isinstance(schedule, GradualThreshold):
    return schedule.pruning_window()
  begin = getattr(schedule, "begin_step", None)
  end = getattr(schedule, "end_step", None)
  if begin is None or end is None:
    raise ValueError(
        f"{type(schedule).__name__} has no begin_step/end_step attributes, "
        f"so the pruning window (needed by group_lasso) is unknown; give it "
        f"those attributes or use ConstantSparsity, PolynomialDecay or "
        f"GradualThreshold.")
  return int(begin), int(end)


def check_schedule(schedule):
  """Returns `schedule` if usable, else raises a `TypeError` saying why."""
  if isinstance(schedule, (GradualThreshold, PruningSchedule)):
    return schedule
  raise TypeError(
      f"pruning_schedule must be a tf_blocksparse.schedules.GradualThreshold "
      f"or a tfmot.sparsity.keras.PruningSchedule (ConstantSparsity, "
      f"PolynomialDecay, ...), got {type(schedule).__name__}.")


def as_block_schedule(schedule):
  return BlockSchedule(check_schedule(schedule))


_KNOWN = {"GradualThreshold": GradualThreshold,
          "ConstantSparsity": ConstantSparsity,
          "PolynomialDecay": PolynomialDecay}


def serialize(schedule):
  """`{"class_name", "config"}` of a schedule of either kind."""
  if isinstance(schedule, GradualThreshold):
    return {"class_name": "GradualThreshold", "config": schedule.get_config()}
  # tfmot's schedules already return this shape.
  return schedule.get_config()


def deserialize(config):
  """Inverse of `serialize`; custom schedules must be registered with
  `tf_keras.utils.register_keras_serializable`."""
  return tf_keras.utils.deserialize_keras_object(
      config, module_objects=_KNOWN, printable_module_name="pruning schedule")
