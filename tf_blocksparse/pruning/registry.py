"""Which layers hold which prunable weights, in one declarative table.

Three tables drive everything:
- `WEIGHT_LAYERS`: layers (or RNN cells) that own prunable weights, each
  weight given as a `Spec`: its name, where it lives on the layer, how its
  last axes split into gate slices (GRU: 3, LSTM: 4, a depthwise kernel:
  one slice per input channel, an attention projection: one per head) and
  which axes make the rows of its matrix view (`block_masks.matrix_shape`).
  Block masks are computed per slice, so no block straddles two gates,
  channels or heads.
- `CONTAINERS`: layers that own no weights themselves but hold sublayers
  that do (`Bidirectional`, `RNN(cell)`, `StackedRNNCells`,
  `TimeDistributed`), with a function naming each child.
- `LEFT_DENSE`: layers that a whole-model or list pruning pass leaves
  untouched (no weights, or weights nobody prunes: norms).

A custom layer takes part by defining `get_prunable_weights()` (tfmot's
protocol); its weights, of any rank, are treated as ungated.
"""

import collections

import tf_keras

layers = tf_keras.layers

# How one prunable weight is seen by the masks: `path` names it inside the
# wrapped layer (unique, used for variable names), `variable` is the weight,
# `gates` the number of equal slices of its matrix view's columns, `row_axes`
# the axes that make the view's rows (see `block_masks.matrix_shape`).
PrunableWeight = collections.namedtuple(
    "PrunableWeight", ["path", "variable", "gates", "row_axes"],
    defaults=(None,))

# `attr` is a dotted attribute path; `gates` an int or a function of the
# weight's shape; `row_axes` as in `block_masks.matrix_shape`.
Spec = collections.namedtuple("Spec", ["name", "attr", "gates", "row_axes"],
                              defaults=(1, None))


def _per_input_channel(shape):
  return int(shape[-2])


def _per_head(shape):
  return int(shape[1])


_DEPTHWISE = Spec("depthwise_kernel", "depthwise_kernel", _per_input_channel,
                  -2)

# Biases are never listed: they are never pruned. Order matters: the first
# matching class wins (DepthwiseConv2D and SeparableConv2D are Convs).
WEIGHT_LAYERS = (
    (layers.Dense, (Spec("kernel", "kernel"),)),
    (layers.DepthwiseConv1D, (_DEPTHWISE,)),
    (layers.DepthwiseConv2D, (_DEPTHWISE,)),
    (layers.SeparableConv1D,
     (_DEPTHWISE, Spec("pointwise_kernel", "pointwise_kernel"))),
    (layers.SeparableConv2D,
     (_DEPTHWISE, Spec("pointwise_kernel", "pointwise_kernel"))),
    # Conv1D/2D/3D and their Transpose subclasses.
    (layers.Conv1D, (Spec("kernel", "kernel"),)),
    (layers.Conv2D, (Spec("kernel", "kernel"),)),
    (layers.Conv3D, (Spec("kernel", "kernel"),)),
    (layers.LocallyConnected1D, (Spec("kernel", "kernel"),)),
    (layers.LocallyConnected2D, (Spec("kernel", "kernel"),)),
    (layers.Embedding, (Spec("embeddings", "embeddings"),)),
    # Projections `[dim, heads, key_dim]` seen as `[dim, heads * key_dim]`
    # with one slice per head; the output `[heads, key_dim, dim]` as
    # `[heads * key_dim, dim]`.
    (layers.MultiHeadAttention,
     (Spec("query_kernel", "_query_dense.kernel", _per_head, 1),
      Spec("key_kernel", "_key_dense.kernel", _per_head, 1),
      Spec("value_kernel", "_value_dense.kernel", _per_head, 1),
      Spec("output_kernel", "_output_dense.kernel", 1, None))),
    (layers.SimpleRNNCell, (Spec("kernel", "kernel"),
                            Spec("recurrent_kernel", "recurrent_kernel"))),
    (layers.GRUCell, (Spec("kernel", "kernel", 3),
                      Spec("recurrent_kernel", "recurrent_kernel", 3))),
    (layers.LSTMCell, (Spec("kernel", "kernel", 4),
                       Spec("recurrent_kernel", "recurrent_kernel", 4))),
)

# Order matters: the first matching class wins (GRU and LSTM are RNNs).
CONTAINERS = (
    (layers.Bidirectional,
     lambda l: (("forward", l.forward_layer), ("backward", l.backward_layer))),
    (layers.TimeDistributed, lambda l: (("inner", l.layer),)),
    (layers.StackedRNNCells,
     lambda l: tuple((f"cell{i}", c) for i, c in enumerate(l.cells))),
    (layers.RNN, lambda l: (("cell", l.cell),)),
)

_LEFT_DENSE_NAMES = (
    "InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "Flatten", "Reshape", "Permute", "RepeatVector", "Activation", "ReLU",
    "Softmax", "LeakyReLU", "ELU", "PReLU", "ThresholdedReLU", "Masking",
    "Lambda", "Identity", "ActivityRegularization", "BatchNormalization",
    "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D",
    "AveragePooling2D", "AveragePooling3D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "GlobalMaxPooling3D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalAveragePooling3D", "ZeroPadding1D",
    "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D",
    "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "Add",
    "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate",
    "Dot", "Rescaling", "CenterCrop", "Resizing", "Normalization",
)
LEFT_DENSE = tuple(getattr(layers, name) for name in _LEFT_DENSE_NAMES
                   if hasattr(layers, name))


def supported_names():
  """Human readable list of what can be pruned, for error messages."""
  names = [cls.__name__ for cls, _ in WEIGHT_LAYERS]
  names += ["Conv1DTranspose/Conv2DTranspose/Conv3DTranspose", "SimpleRNN", "GRU", "LSTM", "RNN(cell) incl. StackedRNNCells",
            "Bidirectional(<RNN>)", "TimeDistributed(<supported layer>)",
            "any layer defining get_prunable_weights()"]
  return ", ".join(names)


def _weight_spec(layer):
  for cls, spec in WEIGHT_LAYERS:
    if isinstance(layer, cls):
      return spec
  return None


def _children(layer):
  for cls, children in CONTAINERS:
    if isinstance(layer, cls):
      return children(layer)
  return None


def _has_custom_protocol(layer):
  method = getattr(layer, "get_prunable_weights", None)
  # The wrapper gives its wrapped layer this method (tfmot's helpers call
  # it); that one must not hide the layer's own table entry.
  return callable(method) and not getattr(method, "_tfbs_attached", False)


def _get_attr(layer, dotted):
  obj = layer
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


def unsupported_reason(layer, _where=""):
  """Returns why `layer` cannot be wrapped, or None when it can.

  Works on unbuilt layers: it only looks at classes and sublayers.
  """
  where = _where or f"{type(layer).__name__} layer '{layer.name}'"
  if (_has_custom_protocol(layer) or _weight_spec(layer) is not None or
      is_left_dense(layer)):
    return None   # a left-dense layer wrapped on its own: nothing pruned
  children = _children(layer)
  if children is None:
    return (f"Cannot block prune {where}: {type(layer).__name__} is not "
            f"supported. Supported: {supported_names()}. To leave a layer "
            f"dense, wrap only the others (e.g. with tf_keras.models."
            f"clone_model(model, clone_function=...)).")
  for name, child in children:
    reason = unsupported_reason(
        child, f"{where} > {name} {type(child).__name__} '{child.name}'")
    if reason:
      return reason
  return None


def is_supported(layer):
  return unsupported_reason(layer) is None


def is_left_dense(layer):
  """True for layers a whole-model or list pass leaves as they are."""
  return isinstance(layer, LEFT_DENSE) and not _has_custom_protocol(layer)


def prunable_weights(layer, _prefix=""):
  """The prunable weights of a built `layer`, as `PrunableWeight`s.

  >>> import tf_keras
  >>> gru = tf_keras.layers.GRU(8); gru.build((None, 5, 3))
  >>> [(w.path, w.gates) for w in prunable_weights(gru)]
  [('cell_kernel', 3), ('cell_recurrent_kernel', 3)]
  """
  if _has_custom_protocol(layer):
    return [PrunableWeight(f"{_prefix}custom{i}", w, 1)
            for i, w in enumerate(layer.get_prunable_weights())]
  if is_left_dense(layer):
    return []
  spec = _weight_spec(layer)
  if spec is not None:
    found = []
    for s in spec:
      var = _get_attr(layer, s.attr)
      gates = s.gates(var.shape) if callable(s.gates) else s.gates
      found.append(PrunableWeight(_prefix + s.name, var, gates, s.row_axes))
    return found
  children = _children(layer)
  if children is None:
    raise ValueError(unsupported_reason(layer))
  found = []
  for name, child in children:
    found += prunable_weights(child, f"{_prefix}{name}_")
  return found
