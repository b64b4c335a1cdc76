"""Which layers hold which prunable weights, in one declarative table.

Three tables drive everything:
- `WEIGHT_LAYERS`: layers (or RNN cells) that own prunable weights, with the
  attribute names of those weights and how many gate slices each splits into
  along its last axis (GRU: 3, LSTM: 4). Block masks are computed per gate
  slice so that no block straddles two gates.
- `CONTAINERS`: layers that own no weights themselves but hold sublayers
  that do (`Bidirectional`, `RNN(cell)`, `StackedRNNCells`,
  `TimeDistributed`), with a function naming each child.
- `LEFT_DENSE`: layers that a whole-model pruning pass leaves untouched
  (no weights, or weights the paper does not prune: embeddings, norms).

A custom layer takes part by defining `get_prunable_weights()` (tfmot's
protocol); its weights are treated as ungated.
"""

import collections

import tf_keras

layers = tf_keras.layers

# How one prunable weight is seen by the masks: `path` names it inside the
# wrapped layer (unique, used for variable names), `variable` is the weight,
# `gates` the number of equal slices of its last axis.
PrunableWeight = collections.namedtuple("PrunableWeight",
                                        ["path", "variable", "gates"])

# Biases are never listed: they are never pruned.
WEIGHT_LAYERS = (
    (layers.Dense, (("kernel", 1),)),
    (layers.Conv1D, (("kernel", 1),)),
    (layers.SimpleRNNCell, (("kernel", 1), ("recurrent_kernel", 1))),
    (layers.GRUCell, (("kernel", 3), ("recurrent_kernel", 3))),
    (layers.LSTMCell, (("kernel", 4), ("recurrent_kernel", 4))),
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

LEFT_DENSE = (
    layers.InputLayer, layers.Dropout, layers.SpatialDropout1D,
    layers.GaussianNoise, layers.GaussianDropout, layers.AlphaDropout,
    layers.Flatten, layers.Reshape, layers.Permute, layers.RepeatVector,
    layers.Activation, layers.ReLU, layers.Softmax, layers.LeakyReLU,
    layers.ELU, layers.Masking, layers.Lambda, layers.ActivityRegularization,
    layers.BatchNormalization, layers.LayerNormalization, layers.Embedding,
    layers.MaxPooling1D, layers.AveragePooling1D, layers.GlobalMaxPooling1D,
    layers.GlobalAveragePooling1D, layers.ZeroPadding1D, layers.Cropping1D,
    layers.UpSampling1D, layers.Add, layers.Subtract, layers.Multiply,
    layers.Average, layers.Maximum, layers.Minimum, layers.Concatenate,
    layers.Dot,
)


def supported_names():
  """Human readable list of what can be pruned, for error messages."""
  names = [cls.__name__ for cls, _ in WEIGHT_LAYERS]
  names += ["SimpleRNN", "GRU", "LSTM", "RNN(cell) incl. StackedRNNCells",
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
  return callable(getattr(layer, "get_prunable_weights", None))


def unsupported_reason(layer, _where=""):
  """Returns why `layer` cannot be wrapped, or None when it can.

  Works on unbuilt layers: it only looks at classes and sublayers.
  """
  where = _where or f"{type(layer).__name__} layer '{layer.name}'"
  if _has_custom_protocol(layer) or _weight_spec(layer) is not None:
    return None
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
  """True for layers a whole-model pass leaves as they are."""
  return isinstance(layer, LEFT_DENSE)


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
  spec = _weight_spec(layer)
  if spec is not None:
    return [PrunableWeight(_prefix + attr, getattr(layer, attr), gates)
            for attr, gates in spec]
  children = _children(layer)
  if children is None:
    raise ValueError(unsupported_reason(layer))
  found = []
  for name, child in children:
    found += prunable_weights(child, f"{_prefix}{name}_")
  return found
