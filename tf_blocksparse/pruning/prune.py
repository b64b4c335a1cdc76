"""The user's entry points: `prune_block_low_magnitude` and
`strip_block_pruning`."""

import difflib

import tf_keras

from tf_blocksparse.pruning import block_masks
from tf_blocksparse.pruning import checks
from tf_blocksparse.pruning import registry
from tf_blocksparse.pruning import schedules
from tf_blocksparse.pruning import wrapper as wrapper_lib

PruneBlockLowMagnitude = wrapper_lib.PruneBlockLowMagnitude


def _is_graph_model(model):
  return isinstance(model, tf_keras.Sequential) or getattr(
      model, "_is_graph_network", False)


def _check_model(model):
  if not _is_graph_model(model):
    raise ValueError(
        f"{type(model).__name__} is a subclassed model; block pruning (like "
        f"tfmot) can only rebuild Sequential and functional models. Wrap the "
        f"layers inside your model's __init__ with prune_block_low_magnitude "
        f"instead.")


def prune_block_low_magnitude(to_prune, block_size=(4, 4),
                              pruning_schedule=None, block_pooling="max",
                              group_lasso=0.0, sparsity_m_by_n=None,
                              pruning_policy=None, block_pooling_type=None,
                              **kwargs):
  """Wraps layers so that their weights are pruned in whole blocks.

  Accepts what tfmot's `prune_low_magnitude` accepts, with its keyword
  arguments: a layer, a list of layers, or a Sequential/functional
  tf_keras model (whose layers are wrapped in a clone sharing the original
  weights). In a list or a model, layers without prunable weights (Dropout,
  pooling, normalisation, ...) are left as they are. Pruned: the kernels of
  Dense, Conv1D/2D/3D (and Transpose), LocallyConnected1D/2D and the
  pointwise kernel of SeparableConv (a kernel of rank > 2 is seen as
  `[prod(all but the last axes), last]`), depthwise kernels `[.., in,
  mult]` as `[taps, in * mult]` per input channel, MultiHeadAttention's
  query/key/value kernels as `[dim, heads * key_dim]` per head and its
  output kernel as `[heads * key_dim, dim]`, Embedding tables, the input
  and recurrent kernels of SimpleRNN/GRU/LSTM, also inside Bidirectional,
  RNN(cell), StackedRNNCells and TimeDistributed, and the
  `get_prunable_weights()` of any layer (of any rank; a vector is one
  row). Biases are never pruned. GRU/LSTM kernels are masked per gate
  slice, so no block straddles two gates (or channels, or heads); weights
  (or slices) that are not a multiple of the block have partial blocks at
  their edges.

  Train with `callbacks=[tfbs.UpdatePruningStep()]`, then call
  `strip_block_pruning`.

  Args:
    to_prune: a tf_keras layer, a list of layers, or a model.
    block_size: `(bh, bw)` or an int; `(1, 1)` is element-wise pruning.
    pruning_schedule: a tfmot `PruningSchedule` (sparsity-target mode: keep
      the largest blocks) or `tfbs.schedules.GradualThreshold` (threshold
      mode). Defaults to `ConstantSparsity(0.5, begin_step=0)`.
    block_pooling: block representative: `"max"` (largest |w|, the
      paper's), `"avg"` or `"l2"`.
    group_lasso: strength λ of the group-lasso penalty λ·Σ‖block‖₂ on the
      pruned weights, added to the model losses only while the schedule is
      pruning (the paper's GLP). 0 disables it.
    sparsity_m_by_n: `(m, n)`: prune m of every n consecutive blocks along
      the input axis (within each input-channel run of a convolution), set
      once when the schedule starts; with `block_size=(1, 1)` this is
      tfmot's M-by-N sparsity (e.g. 2:4).
    pruning_policy: a tfmot `PruningPolicy`; for a model (or list) its
      `ensure_model_supports_pruning` runs first and only the layers its
      `allow_pruning` accepts are wrapped.
    block_pooling_type: tfmot's name for `block_pooling` (`"AVG"`/`"MAX"`).
    **kwargs: Keras layer arguments (e.g. `name`) of the wrapper when
      `to_prune` is a single layer; anything else is a TypeError.

  Returns:
    The wrapped layer, list or model (an uncompiled clone).

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> model = tf_keras.Sequential([tf_keras.Input((5, 4)),
  ...                              tf_keras.layers.LSTM(8),
  ...                              tf_keras.layers.Dense(1)])
  >>> pruned = tfbs.prune_block_low_magnitude(
  ...     model, block_size=(2, 2),
  ...     pruning_schedule=tfbs.schedules.ConstantSparsity(0.5, 0, frequency=1))
  >>> pruned.compile("sgd", "mse")
  >>> _ = pruned.fit(np.ones((4, 5, 4)), np.ones((4, 1)), verbose=0,
  ...                callbacks=[tfbs.UpdatePruningStep()])
  >>> lstm_kernel = tfbs.strip_block_pruning(pruned).layers[0].cell.kernel
  >>> float(np.mean(lstm_kernel.numpy() == 0))
  0.5
  """
  checks.reject_keras3(to_prune)
  if _is_schedule(block_size):
    raise TypeError(
        "The second positional argument of prune_block_low_magnitude is "
        "block_size (tfmot's is pruning_schedule); pass the schedule by "
        "keyword: prune_block_low_magnitude(model, pruning_schedule=...).")
  block_pooling = _pooling(block_pooling, block_pooling_type)
  is_layer = (isinstance(to_prune, tf_keras.layers.Layer) and
              not isinstance(to_prune, tf_keras.Model))
  _check_kwargs(kwargs, is_layer)
  _check_policy(pruning_policy)
  params = dict(block_size=block_size, pruning_schedule=pruning_schedule,
                block_pooling=block_pooling, group_lasso=group_lasso,
                sparsity_m_by_n=block_masks.check_m_by_n(sparsity_m_by_n))

  def wrap(layer):
    checks.reject_keras3(layer)
    if isinstance(layer, PruneBlockLowMagnitude):
      return layer
    if isinstance(layer, tf_keras.Model):
      _check_model(layer)
      return tf_keras.models.clone_model(layer, clone_function=wrap)
    if registry.is_left_dense(layer):
      return layer
    if not registry.is_supported(layer) and not layer.weights and \
        layer.built:
      return layer  # holds nothing to prune
    if pruning_policy is not None and not pruning_policy.allow_pruning(
        layer):
      return layer
    return PruneBlockLowMagnitude(layer, **params)

  if isinstance(to_prune, (list, tuple)):
    out = []
    for layer in to_prune:
      checks.reject_keras3(layer)
      if isinstance(layer, tf_keras.layers.InputLayer):
        out.append(layer.__class__.from_config(layer.get_config()))
      else:
        out.append(wrap(layer))
    return out
  if isinstance(to_prune, tf_keras.Model):
    _check_model(to_prune)
    if pruning_policy is not None:
      pruning_policy.ensure_model_supports_pruning(to_prune)
    return tf_keras.models.clone_model(to_prune, clone_function=wrap)
  if isinstance(to_prune, PruneBlockLowMagnitude):
    return to_prune
  if is_layer:
    return PruneBlockLowMagnitude(to_prune, **params, **kwargs)
  raise TypeError(
      f"prune_block_low_magnitude takes a tf_keras layer, a list of layers, "
      f"or a Sequential/functional tf_keras model; got "
      f"{type(to_prune).__name__}.")


# Keyword arguments of prune_block_low_magnitude, for typo suggestions.
_OWN_ARGUMENTS = ("block_size", "pruning_schedule", "block_pooling",
                  "group_lasso", "sparsity_m_by_n", "pruning_policy",
                  "block_pooling_type")
# What tf_keras' Layer.__init__ takes, i.e. what a single wrapper accepts.
_LAYER_ARGUMENTS = ("name", "dtype", "trainable", "dynamic", "input_dim",
                    "input_shape", "batch_input_shape", "batch_size",
                    "weights", "activity_regularizer", "autocast",
                    "implementation")


def _is_schedule(value):
  return isinstance(value, (schedules.PruningSchedule,
                            schedules.GradualThreshold))


def _pooling(block_pooling, block_pooling_type):
  if block_pooling_type is None:
    return block_pooling
  name = block_masks.check_pooling(block_pooling_type)
  if block_masks.check_pooling(block_pooling) not in ("max", name):
    raise ValueError(
        f"block_pooling={block_pooling!r} and block_pooling_type="
        f"{block_pooling_type!r} disagree; give only one of them "
        f"(block_pooling_type is tfmot's name for block_pooling).")
  return name


def _check_kwargs(kwargs, is_layer):
  allowed = _LAYER_ARGUMENTS if is_layer else ()
  unknown = sorted(k for k in kwargs if k not in allowed)
  if not unknown:
    return
  hints = []
  for k in unknown:
    close = difflib.get_close_matches(k, _OWN_ARGUMENTS + allowed, n=1)
    hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close
                             else ""))
  where = ("a layer takes these and Keras layer arguments such as name"
           if is_layer else "a model or a list takes only these; Keras layer "
           "arguments such as name apply to a single layer")
  raise TypeError(
      f"prune_block_low_magnitude got unexpected keyword argument(s) "
      f"{', '.join(hints)}. It takes {', '.join(_OWN_ARGUMENTS)}; {where}.")


def _check_policy(policy):
  if policy is None:
    return
  if not (callable(getattr(policy, "allow_pruning", None)) and callable(
      getattr(policy, "ensure_model_supports_pruning", None))):
    raise TypeError(
        f"pruning_policy must be a tfmot.sparsity.keras.PruningPolicy (with "
        f"allow_pruning and ensure_model_supports_pruning), e.g. "
        f"PruneForLatencyOnXNNPack(); got {type(policy).__name__}.")


def _apply_masks(model):
  for layer in wrapper_lib.collect_block_pruning_layers(model):
    if layer.built:
      layer.pruning_obj.weight_mask_op()


def strip_block_pruning(model):
  """Removes the pruning wrappers, leaving the zeros in the weights.

  The masks are applied once more first (the last optimizer step may have
  moved pruned weights), so every pruned block is exactly zero. Accepts a
  model (returns a clone sharing the layers), a wrapper (returns the
  wrapped layer) or a list of layers. tfmot's `strip_pruning` also works on
  our wrappers but relies on `UpdatePruningStep` having re-masked.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> layer = tfbs.prune_block_low_magnitude(tf_keras.layers.Dense(4))
  >>> _ = layer(np.ones((1, 4), np.float32))
  >>> type(tfbs.strip_block_pruning(layer)).__name__
  'Dense'
  """
  checks.reject_keras3(model)
  if isinstance(model, PruneBlockLowMagnitude):
    if model.built:
      model.pruning_obj.weight_mask_op()
    return model.layer
  if isinstance(model, (list, tuple)):
    return [strip_block_pruning(l) if isinstance(l, PruneBlockLowMagnitude)
            else l for l in model]
  if not isinstance(model, tf_keras.Model):
    raise TypeError(f"strip_block_pruning takes a tf_keras model or a pruned "
                    f"layer, got {type(model).__name__}.")
  _check_model(model)
  _apply_masks(model)

  def unwrap(layer):
    if isinstance(layer, tf_keras.Model):
      return tf_keras.models.clone_model(layer, clone_function=unwrap)
    if isinstance(layer, PruneBlockLowMagnitude):
      inner = layer.layer
      if (not hasattr(inner, "_batch_input_shape") and
          hasattr(layer, "_batch_input_shape")):
        inner._batch_input_shape = layer._batch_input_shape
      return inner
    return layer

  return tf_keras.models.clone_model(model, clone_function=unwrap)
