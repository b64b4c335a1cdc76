"""`PruneBlockLowMagnitude`: the Keras wrapper that block prunes a layer.

It subclasses tfmot's `PruneLowMagnitude`, so tfmot's `UpdatePruningStep`,
`PruningSummaries`, `strip_pruning` and `prune_low_magnitude` recognise it,
and keeps tfmot's step protocol: `pruning_step` starts at -1, the callback
sets it to 0 when training begins, and every training call adds one before
the masks are (maybe) updated. Each call then writes `weight * mask` into the
weights before the wrapped layer runs, which also covers RNN cells that read
their kernels inside a loop. All these writes happen in one cross-replica
call per training call (see `distributed`), so the wrapper trains under
`tf.distribute` strategies with identical masks on every replica.

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

_MISSING_CALLBACK = mask_update._MISSING_CALLBACK


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
    sparsity_m_by_n: `(m, n)` to prune m of every n consecutive blocks
      along the input axis (tfmot's 2:4 with block (1, 1)), or None.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> w = PruneBlockLowMagnitude(tf_keras.layers.Dense(8), block_size=(2, 4))
  >>> _ = w(np.ones((1, 6), np.float32))
  >>> [mw.path for mw in w.masked_weights]
  ['kernel']
  """

  def __init__(self, layer, pruning_schedule=None, block_size=(4, 4),
               block_pooling="max", group_lasso=0.0, sparsity_m_by_n=None,
               **kwargs):
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
    self.sparsity_m_by_n = block_masks.check_m_by_n(sparsity_m_by_n)
    if self.sparsity_m_by_n is not None:
      schedules.pruning_window(self.pruning_schedule)  # raises if unknown
    # tfmot's attribute, read by some of its helpers.
    self.block_pooling_type = self.block_pooling.upper()
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
    _give_get_prunable_weights(layer)
    self._call_arguments = _call_arguments(layer)

  def build(self, input_shape):
    tf_keras.layers.Wrapper.build(self, input_shape)
    masked = []
    for target in registry.prunable_weights(self.layer):
      var = target.variable
      dtype = getattr(var, "true_dtype", var.dtype)
      block_masks.block_grid(
          block_masks.matrix_shape(var.shape, target.row_axes),
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
                                             mask, threshold, q,
                                             target.row_axes))
    self.masked_weights = masked
    self.pruning_vars = [(m.weight, m.mask, m.threshold) for m in masked]
    self.prunable_weights = [m.weight for m in masked]   # tfmot's attribute
    self.pruning_step = self.add_weight(
        "pruning_step", shape=[], dtype=tf.int64,
        initializer=tf_keras.initializers.Constant(-1), trainable=False)
    self.block_schedule = schedules.as_block_schedule(self.pruning_schedule)
    self.pruning_obj = mask_update.BlockPruning(
        masked, self.pruning_step, self.block_schedule,
        self.block_size, self.block_pooling, self.sparsity_m_by_n)
    if self.group_lasso:
      self.add_loss(self.group_lasso_penalty)
    self.built = True

  def group_lasso_penalty(self):
    """group_lasso × Σ block L2 norms while the schedule prunes, else 0."""
    active = self.block_schedule.is_pruning(self.pruning_step)
    return (tf.cast(active, tf.float32) * self.group_lasso *
            self.pruning_obj.group_lasso())

  def __call__(self, inputs, *args, **kwargs):
    if args:
      # Name extra positional inputs (attention's `value`, `key`) after the
      # wrapped layer's call, so Keras records them in the functional
      # config and clones/loads pass them again.
      names = [p.name for p in list(inspect.signature(
          self.layer.call).parameters.values())[1:]]
      if len(args) > len(names):
        raise TypeError(f"{type(self.layer).__name__}.call takes at most "
                        f"{len(names) + 1} positional arguments, got "
                        f"{len(args) + 1}.")
      kwargs.update(zip(names, args))
    _build_attention(self.layer, (inputs,), kwargs)
    return super().__call__(inputs, **kwargs)

  def call(self, inputs, training=None, **kwargs):
    if training is None:
      training = tf_keras.backend.learning_phase()
    self.pruning_obj.training_call(training)
    accepted = self._call_arguments
    if accepted is not None:
      # e.g. the `mask` Keras hands to us after a Masking layer, which
      # Dense.call does not take.
      kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if accepted is None or "training" in accepted:
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
        "sparsity_m_by_n": self.sparsity_m_by_n,
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
    if config.get("sparsity_m_by_n") is not None:
      config["sparsity_m_by_n"] = tuple(config["sparsity_m_by_n"])
    return cls(**config)


def _build_attention(layer, args, kwargs):
  """MultiHeadAttention creates its projections from the shapes of query,
  value and key on its first call (or from its config, unbuilt), and Keras
  builds a wrapper from the first input only; build them here, so the
  wrapper finds the kernels."""
  if not isinstance(layer, tf_keras.layers.MultiHeadAttention):
    return
  # pylint: disable=protected-access
  with tf.init_scope():
    if not layer._built_from_signature:
      names = ("query", "value", "key")
      given = dict(zip(names, args))
      given.update({k: kwargs[k] for k in names if k in kwargs})
      if "query" not in given or "value" not in given:
        return   # Keras raises its own error for the missing input
      layer._build_from_signature(query=given["query"], value=given["value"],
                                  key=given.get("key"))
    # The projections build on first use; the output one reads the heads'
    # outputs, `[..., heads, value_dim]`.
    shapes = ((layer._query_dense, layer._query_shape),
              (layer._key_dense, layer._key_shape),
              (layer._value_dense, layer._value_shape),
              (layer._output_dense, layer._query_shape[:-1].concatenate(
                  [layer._num_heads, layer._value_dim])))
    for sublayer, shape in shapes:
      if not sublayer.built:
        sublayer.build(shape)


def _call_arguments(layer):
  """Names `layer.call` takes besides its inputs; None if it takes any."""
  params = inspect.signature(layer.call).parameters.values()
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return None
  return frozenset(p.name for p in params)


def _give_get_prunable_weights(layer):
  """Gives `layer` tfmot's `get_prunable_weights()`, which tfmot's helpers
  call on `wrapper.layer`, unless it has its own."""
  if callable(getattr(layer, "get_prunable_weights", None)):
    return

  def get_prunable_weights():
    return [w.variable for w in registry.prunable_weights(layer)]

  get_prunable_weights._tfbs_attached = True   # pylint: disable=protected-access
  layer.get_prunable_weights = get_prunable_weights


def collect_block_pruning_layers(model):
  """All `PruneBlockLowMagnitude` wrappers in `model`, nested models too."""
  found = []
  for layer in model._flatten_layers(include_self=False):
    if isinstance(layer, PruneBlockLowMagnitude):
      found.append(layer)
  return found
