"""`PruneBlockLowMagnitude`: the Keras wrapper that block prunes a layer.

It subclasses tfmot's `PruneLowMagnitude`, so tfmot's `UpdatePruningStep`,
`PruningSummaries`, `strip_pruning` and `prune_low_magnitude` recognise it,
and keeps tfmot's step protocol: `pruning_step` starts at -1, the callback
sets it to 0 when training begins, and every training call adds one before
the masks are (maybe) updated. Each call then writes `weight * mask` into the
weights before the wrapped layer runs, which also covers RNN cells that read
their kernels inside a loop.

Unlike tfmot's wrapper it masks per gate slice with partial edge blocks,
wraps `Bidirectional`/`RNN(cell)`/`TimeDistributed`, names every variable
uniquely (so h5 saving works for RNNs), supports threshold schedules and can
add a group-lasso penalty while pruning.
"""

import inspect

import tensorflow as tf
import tf_keras
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_schedule as tfmot_schedule)
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_wrapper as tfmot_wrapper)

from tf_blocksparse.pruning import block_masks
from tf_blocksparse.pruning import checks
from tf_blocksparse.pruning import mask_update
from tf_blocksparse.pruning import registry
from tf_blocksparse.pruning import schedules

_MISSING_CALLBACK = (
    "Block pruning needs the tf_blocksparse.UpdatePruningStep (or tfmot's) "
    "callback during training: model.fit(..., callbacks=["
    "tfbs.UpdatePruningStep()]).")


def default_schedule():
  """tfmot's default: 50% of the blocks, masks updated every 100 steps."""
  return tfmot_schedule.ConstantSparsity(0.5, begin_step=0, frequency=100)


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class PruneBlockLowMagnitude(tfmot_wrapper.PruneLowMagnitude):
  """Wraps a layer so that its prunable weights are pruned in whole blocks.

  Use `prune_block_low_magnitude` rather than this class directly.

  Args:
    layer: a supported tf_keras layer (see `registry.supported_names()`).
    pruning_schedule: a `GradualThreshold` or any tfmot `PruningSchedule`.
    block_size: `(bh, bw)` or an int.
    block_pooling: block representative, `"max"`, `"avg"` or `"l2"`.
    group_lasso: strength of the group-lasso penalty added to the losses
      while the schedule is pruning (0 disables it).

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> w = PruneBlockLowMagnitude(tf_keras.layers.Dense(8), block_size=(2, 4))
  >>> _ = w(np.ones((1, 6), np.float32))
  >>> [mw.path for mw in w.masked_weights]
  ['kernel']
  """

  def __init__(self, layer, pruning_schedule=None, block_size=(4, 4),
               block_pooling="max", group_lasso=0.0, **kwargs):
    checks.reject_keras3(layer)
    if not isinstance(layer, tf_keras.layers.Layer):
      raise TypeError(f"PruneBlockLowMagnitude wraps a tf_keras layer, got "
                      f"{type(layer).__name__}.")
    if isinstance(layer, tf_keras.Model):
      raise TypeError("Pass a model to prune_block_low_magnitude, which wraps "
                      "its layers, not to PruneBlockLowMagnitude.")
    reason = registry.unsupported_reason(layer)
    if reason:
      raise ValueError(reason)
    if pruning_schedule is None:
      pruning_schedule = default_schedule()
    self.pruning_schedule = schedules.check_schedule(pruning_schedule)
    self.block_size = block_masks.check_block_size(block_size)
    self.block_pooling = block_masks.check_pooling(block_pooling)
    self.group_lasso = checks.non_negative("group_lasso", group_lasso)
    if self.group_lasso:
      schedules.pruning_window(self.pruning_schedule)  # raises if unknown
    # tfmot's attributes, read by some of its helpers.
    self.block_pooling_type = self.block_pooling.upper()
    self.sparsity_m_by_n = None
    self.pruning_obj = None
    self.pruning_vars = []
    self.masked_weights = []
    kwargs.setdefault("name", f"prune_block_{layer.name}")
    # Skip PruneLowMagnitude.__init__: it insists on tfmot's registry.
    tf_keras.layers.Wrapper.__init__(self, layer, **kwargs)
    self._track_trackable(layer, name="layer")
    # Lets the first layer of a Sequential keep its input shape.
    if (not hasattr(self, "_batch_input_shape") and
        hasattr(layer, "_batch_input_shape")):
      self._batch_input_shape = layer._batch_input_shape
    self.supports_masking = getattr(layer, "supports_masking", False)

  def build(self, input_shape):
    tf_keras.layers.Wrapper.build(self, input_shape)
    masked = []
    for target in registry.prunable_weights(self.layer):
      var = target.variable
      dtype = getattr(var, "true_dtype", var.dtype)
      block_masks.block_grid(block_masks.matrix_shape(var.shape),
                             self.block_size, target.gates)
      # Unique names: h5 files key the weights of a layer by name.
      mask = self.add_weight(
          f"{target.path}_mask", shape=var.shape, dtype=dtype,
          initializer="ones", trainable=False,
          aggregation=tf.VariableAggregation.MEAN)
      threshold = self.add_weight(
          f"{target.path}_threshold", shape=[], dtype=dtype,
          initializer="zeros", trainable=False,
          aggregation=tf.VariableAggregation.MEAN)
      q = self.add_weight(
          f"{target.path}_q", shape=[], dtype=dtype,
          initializer=tf_keras.initializers.Constant(-1.0), trainable=False,
          aggregation=tf.VariableAggregation.MEAN)
      masked.append(mask_update.MaskedWeight(target.path, var, target.gates,
                                             mask, threshold, q))
    self.masked_weights = masked
    self.pruning_vars = [(m.weight, m.mask, m.threshold) for m in masked]
    self.pruning_step = self.add_weight(
        "pruning_step", shape=[], dtype=tf.int64,
        initializer=tf_keras.initializers.Constant(-1), trainable=False)
    self.block_schedule = schedules.as_block_schedule(self.pruning_schedule)
    self.pruning_obj = mask_update.BlockPruning(
        masked, lambda: self.pruning_step, self.block_schedule,
        self.block_size, self.block_pooling)
    if self.group_lasso:
      self.add_loss(self.group_lasso_penalty)
    self.built = True

  def group_lasso_penalty(self):
    """group_lasso × Σ block L2 norms while the schedule prunes, else 0."""
    active = self.block_schedule.is_pruning(self.pruning_step)
    return (tf.cast(active, tf.float32) * self.group_lasso *
            self.pruning_obj.group_lasso())

  def call(self, inputs, training=None, **kwargs):
    if training is None:
      training = tf_keras.backend.learning_phase()

    def train_step_updates():
      step = self.pruning_step.assign_add(1)
      with tf.control_dependencies([step]):
        check = tf.debugging.assert_greater_equal(
            self.pruning_step, tf.constant(1, tf.int64),
            message=_MISSING_CALLBACK)
      with tf.control_dependencies([check]):
        return self.pruning_obj.conditional_mask_update()

    checks.smart_cond(training, train_step_updates,
                      lambda: tf.constant(False))
    self.pruning_obj.weight_mask_op()
    if "training" in inspect.getfullargspec(self.layer.call).args:
      kwargs["training"] = training
    return self.layer.call(inputs, **kwargs)

  def compute_mask(self, inputs, mask=None):
    return self.layer.compute_mask(inputs, mask)

  @property
  def losses(self):
    # tfmot's wrapper drops its own penalty losses; Keras' default does not.
    return tf_keras.layers.Layer.losses.fget(self)

  def get_weights(self):
    return tf_keras.layers.Layer.get_weights(self)

  def set_weights(self, weights):
    tf_keras.layers.Layer.set_weights(self, weights)

  def get_config(self):
    config = tf_keras.layers.Wrapper.get_config(self)
    config.update({
        "pruning_schedule": schedules.serialize(self.pruning_schedule),
        "block_size": self.block_size,
        "block_pooling": self.block_pooling,
        "group_lasso": self.group_lasso,
    })
    return config

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    config["pruning_schedule"] = schedules.deserialize(
        config["pruning_schedule"])
    config["layer"] = tf_keras.layers.deserialize(
        config["layer"], custom_objects=custom_objects)
    config["block_size"] = tuple(config["block_size"])
    return cls(**config)


def collect_block_pruning_layers(model):
  """All `PruneBlockLowMagnitude` wrappers in `model`, nested models too."""
  found = []
  for layer in model._flatten_layers(include_self=False):
    if isinstance(layer, PruneBlockLowMagnitude):
      found.append(layer)
  return found
