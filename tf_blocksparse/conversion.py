"""`to_block_sparse`: turns a pruned tf_keras model into block-sparse layers."""

import warnings

import numpy as np
import tf_keras

from tf_blocksparse.bsr.matrix import BlockSparseMatrix
from tf_blocksparse.layers import _bsr_weights
from tf_blocksparse.layers.block_sparse_dense import BlockSparseDense
from tf_blocksparse.layers.block_sparse_rnn import BlockSparseGRU
from tf_blocksparse.layers.block_sparse_rnn import BlockSparseLSTM
from tf_blocksparse.layers.block_sparse_rnn import BlockSparseSimpleRNN

# Block shapes tried when none is given, largest first: the detected shape
# is the largest one whose all-zero blocks hold (nearly) all the zeros.
CANDIDATE_BLOCK_SIZES = ((32, 32), (16, 16), (8, 8), (4, 4), (16, 1), (1, 16),
                         (8, 1), (1, 8), (2, 2), (4, 1), (1, 4))
# Fraction of a weight's zeros that must lie in all-zero blocks; below it
# the zeros are not block structured at that block shape.
_COVERAGE = 0.98

_RNN_TWINS = (
    (tf_keras.layers.LSTM, BlockSparseLSTM),
    (tf_keras.layers.GRU, BlockSparseGRU),
    (tf_keras.layers.SimpleRNN, BlockSparseSimpleRNN),
)
_OURS = (BlockSparseDense, BlockSparseLSTM, BlockSparseGRU,
         BlockSparseSimpleRNN)


class BlockStructureWarning(UserWarning):
  """A sparse weight was left dense because its zeros are not in blocks."""


def to_block_sparse(model, min_sparsity=0.5, block_size=None):
  """The same architecture with pruned layers replaced by block-sparse ones.

  Every `Dense`, `SimpleRNN`, `GRU` and `LSTM` (also inside `Bidirectional`
  and `TimeDistributed`, and inside a pruning wrapper: anything with a
  `.layer` and `.pruning_vars`, whose masks are applied) becomes
  `BlockSparseDense` / `BlockSparseSimpleRNN` / `BlockSparseGRU` /
  `BlockSparseLSTM` when at least one of its weight matrices has a fraction
  of zeros `>= min_sparsity` with the zeros in whole blocks. Weights below
  `min_sparsity` stay dense (a layer with none above stays the tf_keras
  layer); a sparse weight whose zeros are not block structured stays dense
  with a `BlockStructureWarning`. Other layers are copied with their
  weights. The result computes what `model` computes; compile it again to
  fine-tune (the block values are trainable, the layouts fixed).

  Args:
    model: a built functional or `Sequential` tf_keras model, pruned
      (wrapped or stripped).
    min_sparsity: fraction of zero weights from which a weight is stored
      block sparse.
    block_size: int or `(bh, bw)`; by default the pruning wrapper's block
      size, else detected from the zeros (`CANDIDATE_BLOCK_SIZES`).

  Returns:
    A new tf_keras model.

  Raises:
    TypeError: `model` is not a functional or Sequential tf_keras model.
    ValueError: no layer is eligible, or bad arguments.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> model = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(8)])
  >>> w = np.kron(np.eye(2), np.ones([8, 4])).astype(np.float32)
  >>> model.layers[0].set_weights([w, np.zeros(8, np.float32)])
  >>> sparse = tfbs.to_block_sparse(model, min_sparsity=0.5)
  >>> type(sparse.layers[0]).__name__, sparse.layers[0].block_size
  ('BlockSparseDense', (4, 4))
  >>> x = np.random.rand(2, 16).astype(np.float32)
  >>> np.allclose(sparse(x), model(x), rtol=1e-5, atol=1e-6)
  True
  """
  converter, new_model = _convert(model, min_sparsity, block_size)
  if not converter.converted:
    raise ValueError(
        f"no layer of model {model.name} is eligible for block-sparse form "
        f"(min_sparsity={min_sparsity}): " + "; ".join(converter.reasons
                                                       or ["no Dense/SimpleRNN/GRU/LSTM layer"]))
  return new_model


def convert_with_report(model, min_sparsity=0.5, block_size=None):
  """`(model, names of the converted layers)`: `to_block_sparse` for the
  exports, which keep a model with nothing to convert (`model` itself, no
  names) instead of raising. TypeError for a model that cannot be rebuilt."""
  converter, new_model = _convert(model, min_sparsity, block_size)
  if not converter.converted:
    return model, []
  return new_model, list(converter.converted)


def _convert(model, min_sparsity, block_size):
  """Checks the arguments; `(the converter, the rebuilt model)`."""
  if not isinstance(model, tf_keras.Model):
    raise TypeError("to_block_sparse takes a tf_keras Model (functional or "
                    f"Sequential), got {type(model).__module__}."
                    f"{type(model).__name__}")
  if not (isinstance(model, tf_keras.Sequential)
          or getattr(model, "_is_graph_network", False)):
    raise TypeError(f"model {model.name} is a subclassed Model, which cannot "
                    "be rebuilt layer by layer; build it as a functional or "
                    "Sequential model, or convert its layers with "
                    "BlockSparse*.from_dense_layer")
  if not model.built:
    raise ValueError(f"model {model.name} must be built (call it once)")
  if isinstance(min_sparsity, bool) or not isinstance(
      min_sparsity, (int, float, np.floating)) or not 0 <= min_sparsity <= 1:
    raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
  if block_size is not None:
    block_size = _bsr_weights.block_size_pair(block_size)
  converter = _Converter(float(min_sparsity), block_size)
  return converter, converter.convert(model)


def detect_block_size(weights, candidates=CANDIDATE_BLOCK_SIZES):
  """Largest candidate block shape holding the zeros of all `weights`.

  Returns None when no candidate fits every weight (or no weight has
  zeros). A weight fits a block shape when its all-zero blocks hold at
  least 98% of its zeros.

  >>> import numpy as np
  >>> w = np.kron(np.eye(4), np.ones([16, 16]))
  >>> detect_block_size([w])
  (16, 16)
  """
  weights = [np.asarray(w) for w in weights]
  if not weights or not any(np.any(w == 0) for w in weights):
    return None
  for block in candidates:
    if all(_fits(w, block) for w in weights):
      return tuple(block)
  return None


def _fits(w, block):
  zeros = np.count_nonzero(w == 0)
  if zeros == 0:
    return True
  return _zeros_in_zero_blocks(w, block) >= _COVERAGE * zeros


def _zeros_in_zero_blocks(w, block):
  """Number of elements of `w` in blocks that are all zero."""
  (k, n), (bh, bw) = w.shape, block
  nbr, nbc = -(-k // bh), -(-n // bw)
  nonzero = np.zeros((nbr * bh, nbc * bw), bool)
  nonzero[:k, :n] = w != 0
  real = np.zeros((nbr * bh, nbc * bw), np.int64)  # padding is not counted
  real[:k, :n] = 1
  zero_blocks = ~nonzero.reshape(nbr, bh, nbc, bw).any(axis=(1, 3))
  per_block = real.reshape(nbr, bh, nbc, bw).sum(axis=(1, 3))
  return int(per_block[zero_blocks].sum())


def _sparsity(w):
  w = np.asarray(w)
  return float(np.count_nonzero(w == 0)) / max(w.size, 1)


def _is_pruning_wrapper(layer):
  return hasattr(layer, "layer") and hasattr(layer, "pruning_vars")


class _Converter:
  """Clones a model, swapping eligible layers; then copies the weights."""

  def __init__(self, min_sparsity, block_size):
    self.min_sparsity = min_sparsity
    self.block_size = block_size
    self.converted = []
    self.reasons = []
    self._assignments = []

  def convert(self, model):
    new_model = tf_keras.models.clone_model(model,
                                            clone_function=self._clone_layer)
    for assign in self._assignments:
      assign()
    return new_model

  # --- per layer ------------------------------------------------------------

  def _clone_layer(self, layer):
    masked = {}
    hint = None
    while _is_pruning_wrapper(layer):
      for weight, mask, *_ in layer.pruning_vars:
        masked[weight.ref()] = np.asarray(weight) * np.asarray(mask)
      hint = getattr(layer, "block_size", hint)
      layer = layer.layer
    value = lambda v: masked.get(v.ref(), None) if v is not None else None
    values = lambda v: np.asarray(v) if value(v) is None else value(v)
    new = self._convert(layer, values, hint)
    if new is not None:
      return new
    if isinstance(layer, tf_keras.Model):
      inner = _Converter(self.min_sparsity, self.block_size)
      new = inner.convert(layer)
      self.converted += inner.converted
      self.reasons += inner.reasons
      return new
    return self._copy(layer, values)

  def _copy(self, layer, values):
    new = layer.__class__.from_config(layer.get_config())
    weights = [values(w) for w in layer.weights]
    self._assignments.append(lambda: new.set_weights(weights))
    return new

  def _convert(self, layer, values, hint):
    if isinstance(layer, _OURS):
      return None
    if isinstance(layer, tf_keras.layers.TimeDistributed):
      inner = self._convert(layer.layer, values, hint)
      if inner is None:
        return None
      return tf_keras.layers.TimeDistributed(inner, name=layer.name)
    if isinstance(layer, tf_keras.layers.Bidirectional):
      return self._convert_bidirectional(layer, values, hint)
    if isinstance(layer, tf_keras.layers.Dense):
      plan = self._plan(layer, {"kernel": values(layer.kernel)}, hint)
      if plan is None:
        return None
      block, mats = plan
      new = BlockSparseDense(
          units=layer.units, activation=layer.activation,
          use_bias=layer.use_bias, block_size=block,
          kernel_blocks=int(mats["kernel"].num_blocks), name=layer.name,
          dtype=layer.dtype_policy)
      bias = None if layer.bias is None else values(layer.bias)

      def assign():
        new.kernel.assign(mats["kernel"])
        if bias is not None:
          new.bias.assign(bias)
      self._assignments.append(assign)
      return new
    for dense_cls, sparse_cls in _RNN_TWINS:
      if isinstance(layer, dense_cls):
        return self._convert_rnn(layer, sparse_cls, values, hint)
    return None

  def _rnn_weights(self, layer, values):
    cell = layer.cell
    return {"kernel": values(cell.kernel),
            "recurrent_kernel": values(cell.recurrent_kernel)}

  def _convert_rnn(self, layer, sparse_cls, values, hint, target=None,
                   plan=None):
    """The block-sparse twin of an RNN layer (None if it stays dense).

    `target` returns the layer to assign the weights to once the model is
    built (by default the returned one).
    """
    weights = self._rnn_weights(layer, values)
    plan = plan or self._plan(layer, weights, hint)
    if plan is None:
      return None
    block, mats = plan
    config = sparse_cls.converted_config(layer, block, mats.get("kernel"),
                                         mats.get("recurrent_kernel"))
    new = sparse_cls.from_config(config)
    bias = None if layer.cell.bias is None else values(layer.cell.bias)
    kernel = mats.get("kernel", weights["kernel"])
    recurrent = mats.get("recurrent_kernel", weights["recurrent_kernel"])
    target = target or (lambda: new)
    self._assignments.append(
        lambda: target().assign_converted(kernel, recurrent, bias))
    return new

  def _convert_bidirectional(self, layer, values, hint):
    old_sides = (layer.forward_layer, layer.backward_layer)
    plans = []
    for side in old_sides:
      twin = next((s for d, s in _RNN_TWINS if isinstance(side, d)), None)
      plan = None
      if twin is not None:
        plan = self._plan(side, self._rnn_weights(side, values), hint)
      plans.append((twin, plan))
    if all(plan is None for _, plan in plans):
      return None
    # Bidirectional rebuilds its forward layer from the config, so weights
    # go into the layers it holds once the model is built.
    holder = {}
    new_sides = []
    for i, (side, (twin, plan)) in enumerate(zip(old_sides, plans)):
      target = lambda i=i: (holder["new"].forward_layer,
                            holder["new"].backward_layer)[i]
      if plan is not None:
        new_sides.append(self._convert_rnn(side, twin, values, hint, target,
                                           plan))
      else:
        new_sides.append(side.__class__.from_config(side.get_config()))
        weights = [values(w) for w in side.weights]
        self._assignments.append(
            lambda t=target, w=weights: t().set_weights(w))
    new = tf_keras.layers.Bidirectional(
        new_sides[0], backward_layer=new_sides[1], merge_mode=layer.merge_mode,
        name=layer.name)
    holder["new"] = new
    return new

  def _plan(self, layer, weights, hint):
    """`(block_size, {name: BlockSparseMatrix})` for the weights to store
    sparse, or None when the layer stays dense."""
    sparse = {name: w for name, w in weights.items()
              if _sparsity(w) >= self.min_sparsity and _sparsity(w) > 0}
    if not sparse:
      self.reasons.append(
          f"{layer.name}: sparsity " + ", ".join(
              f"{name} {_sparsity(w):.2f}" for name, w in weights.items())
          + f" below min_sparsity {self.min_sparsity}")
      return None
    if self.block_size is not None:
      candidates = [self.block_size]
    elif hint is not None:
      candidates = [tuple(hint)] + [c for c in CANDIDATE_BLOCK_SIZES
                                    if tuple(c) != tuple(hint)]
    else:
      candidates = list(CANDIDATE_BLOCK_SIZES)
    block = detect_block_size(list(sparse.values()), candidates)
    if block is None:
      # Keep the weights that do fit some common block shape.
      fitting = {}
      for c in candidates:
        ok = {n: w for n, w in sparse.items() if _fits(w, c)}
        if len(ok) > len(fitting):
          fitting, block = ok, tuple(c)
      for name in sparse:
        if name not in fitting:
          warnings.warn(
              f"{layer.name}.{name} has {_sparsity(sparse[name]):.0%} zeros "
              "that are not block structured for block shapes "
              f"{[tuple(c) for c in candidates]}; left dense",
              BlockStructureWarning, stacklevel=4)
      sparse = fitting
      if not sparse:
        self.reasons.append(f"{layer.name}: zeros not block structured")
        return None
    mats = {name: BlockSparseMatrix.from_dense(w, block)
            for name, w in sparse.items()}
    self.converted.append(layer.name)
    return block, mats
