"""to_block_sparse: converted models compute what the dense models compute."""

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tf_blocksparse import conversion

L = tf_keras.layers
FEATURES = 12


def block_prune_model(model, block, sparsity, seed=0):
  """Zeros random whole blocks of every 2-D weight; random biases."""
  rng = np.random.default_rng(seed)
  for w in model.weights:
    v = w.numpy()
    if v.ndim == 2:
      k, n = v.shape
      keep = rng.random([-(-k // block[0]), -(-n // block[1])]) >= sparsity
      v = v * np.kron(keep, np.ones(block))[:k, :n]
    else:
      v = rng.standard_normal(v.shape) * 0.2
    w.assign(v.astype(np.float32))
  return model


def inputs(batch=3, time=7, seed=1):
  x = np.random.default_rng(seed).standard_normal(
      [batch, time, FEATURES]).astype(np.float32)
  x[0, 4:] = 0.0  # padding (masked where the model has Masking)
  return x


def assert_same(got_model, want_model, x):
  for g, w in zip(tf.nest.flatten(got_model(x)), tf.nest.flatten(want_model(x))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def rnn_model(layer, masking=True):
  inp = L.Input((None, FEATURES))
  h = L.Masking()(inp) if masking else inp
  out = layer(h)
  return tf_keras.Model(inp, out)


RNN_CASES = [
    (L.LSTM, {"return_sequences": True}),
    (L.LSTM, {"go_backwards": True, "return_state": True}),
    (L.LSTM, {"activation": "relu", "recurrent_activation": "hard_sigmoid",
              "use_bias": False}),
    (L.GRU, {"return_sequences": True}),
    (L.GRU, {"reset_after": False, "go_backwards": True}),
    (L.GRU, {"return_state": True, "return_sequences": True}),
    (L.SimpleRNN, {"return_sequences": True, "activation": "relu"}),
    (L.SimpleRNN, {"go_backwards": True}),
]


@pytest.mark.parametrize("cls,options", RNN_CASES)
def test_each_rnn_kind_and_option(cls, options):
  model = block_prune_model(rnn_model(cls(16, **options)), (4, 4), 0.7)
  sparse = tfbs.to_block_sparse(model)
  converted = sparse.layers[-1]
  assert type(converted).__name__ == "BlockSparse" + cls.__name__
  assert converted.block_size == (4, 4)
  assert_same(sparse, model, inputs())


def test_dense_bidirectional_time_distributed_sequential():
  model = tf_keras.Sequential([
      L.Input((None, FEATURES)), L.Masking(),
      L.Bidirectional(L.LSTM(16, return_sequences=True), merge_mode="ave"),
      L.TimeDistributed(L.Dense(8, activation="tanh")),
      L.GRU(16), L.Dense(32)])
  block_prune_model(model, (8, 8), 0.6)
  # The forward LSTM's weights got ~42% zeros, the backward's >= 50%: at
  # min_sparsity 0.5 only the backward side is converted.
  mixed = tfbs.to_block_sparse(model, min_sparsity=0.5)
  assert type(mixed.layers[1].forward_layer) is L.LSTM
  assert type(mixed.layers[1].backward_layer).__name__ == "BlockSparseLSTM"
  assert_same(mixed, model, inputs())
  sparse = tfbs.to_block_sparse(model, min_sparsity=0.3)
  names = [type(l).__name__ for l in sparse.layers]
  assert names == ["Masking", "Bidirectional", "TimeDistributed",
                   "BlockSparseGRU", "BlockSparseDense"]
  assert type(sparse.layers[1].forward_layer).__name__ == "BlockSparseLSTM"
  assert type(sparse.layers[1].backward_layer).__name__ == "BlockSparseLSTM"
  assert type(sparse.layers[2].layer).__name__ == "BlockSparseDense"
  assert sparse.layers[3].block_size == (8, 8)
  assert_same(sparse, model, inputs())


def test_stored_blocks_and_values_copy_the_pruned_weights():
  model = block_prune_model(tf_keras.Sequential(
      [L.Input((FEATURES,)), L.Dense(32)]), (4, 4), 0.75)
  sparse = tfbs.to_block_sparse(model)
  w = model.layers[0].kernel.numpy()
  nonzero_blocks = np.abs(w).reshape(3, 4, 8, 4).sum(axis=(1, 3)) > 0
  layer = sparse.layers[0]
  assert layer.kernel.values.shape[0] == nonzero_blocks.sum()
  np.testing.assert_array_equal(layer.dense_kernel(), w)


def test_min_sparsity_keeps_weights_dense():
  model = rnn_model(L.LSTM(16), masking=False)
  rng = np.random.default_rng(0)
  kernel, recurrent, bias = model.layers[-1].get_weights()
  kernel = kernel * np.kron(rng.random([3, 16]) > 0.8, np.ones([4, 4]))
  recurrent = recurrent * np.kron(rng.random([4, 16]) > 0.3, np.ones([4, 4]))
  model.layers[-1].set_weights([kernel, recurrent, bias])
  sparse = tfbs.to_block_sparse(model, min_sparsity=0.5)
  cell = sparse.layers[-1].cell
  assert isinstance(cell.kernel, tfbs.layers._bsr_weights.BsrWeight)  # pylint: disable=protected-access
  assert isinstance(cell.recurrent_kernel, tf.Variable)  # ~30%: dense
  assert_same(sparse, model, inputs())
  # Nothing reaches 0.9: no layer is eligible.
  with pytest.raises(ValueError, match="no layer of model .* is eligible"):
    tfbs.to_block_sparse(model, min_sparsity=0.95)


def test_unstructured_zeros_warn_and_stay_dense():
  model = tf_keras.Sequential([L.Input((FEATURES,)), L.Dense(32), L.Dense(8)])
  rng = np.random.default_rng(0)
  first, second = model.layers
  w = first.kernel.numpy()
  first.kernel.assign(w * (rng.random(w.shape) > 0.7))  # unstructured
  block_prune_model(second, (8, 8), 0.7)  # any object with .weights
  with pytest.warns(conversion.BlockStructureWarning, match="not block structured"):
    sparse = tfbs.to_block_sparse(model)
  assert type(sparse.layers[0]) is L.Dense
  assert type(sparse.layers[1]).__name__ == "BlockSparseDense"
  x = np.random.default_rng(1).standard_normal([4, FEATURES]).astype(np.float32)
  assert_same(sparse, model, x)
  # A model whose only sparse weight is unstructured has nothing eligible.
  only = tf_keras.Sequential([L.Input((FEATURES,)), L.Dense(32)])
  only.layers[0].kernel.assign(w * (rng.random(w.shape) > 0.7))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", conversion.BlockStructureWarning)
    with pytest.raises(ValueError, match="not block structured"):
      tfbs.to_block_sparse(only)


def test_detect_block_size():
  rng = np.random.default_rng(0)
  for block in [(16, 16), (4, 4), (8, 1), (1, 16)]:
    keep = rng.random([64 // block[0], 64 // block[1]]) > 0.6
    w = np.kron(keep, np.ones(block)) * rng.standard_normal([64, 64])
    assert conversion.detect_block_size([w]) == block
  assert conversion.detect_block_size([rng.standard_normal([8, 8])]) is None
  # A given block size is used even if a larger one would fit.
  model = block_prune_model(tf_keras.Sequential(
      [L.Input((32,)), L.Dense(32)]), (8, 8), 0.6)
  assert tfbs.to_block_sparse(model, min_sparsity=0.3,
                              block_size=4).layers[0].block_size == (4, 4)


def test_pruning_wrapper_masks_and_block_size_are_used():
  """A still-wrapped model: the wrapper's masks and block size are used."""
  model = tf_keras.Sequential([L.Input((None, FEATURES)),
                               L.LSTM(16, return_sequences=True), L.Dense(4)])
  pruned = tfbs.prune_block_low_magnitude(model, block_size=(4, 4))
  for layer in pruned.layers:
    for weight, mask, *_ in layer.pruning_vars:
      m = mask.numpy()
      k, n = m.shape
      keep = np.random.default_rng(0).random([k // 4, n // 4]) > 0.7
      mask.assign(np.kron(keep, np.ones([4, 4])).astype(m.dtype))
  sparse = tfbs.to_block_sparse(pruned)
  assert [type(l).__name__ for l in sparse.layers] == [
      "BlockSparseLSTM", "BlockSparseDense"]
  # The reference: the stripped model with weight * mask written in.
  stripped = tf_keras.Sequential([L.Input((None, FEATURES)),
                                  L.LSTM(16, return_sequences=True), L.Dense(4)])
  for layer, wrapped in zip(stripped.layers, pruned.layers):
    masked = {id(w): (w.numpy() * m.numpy()) for w, m, *_ in wrapped.pruning_vars}
    layer.set_weights([masked.get(id(w), w.numpy()) for w in wrapped.layer.weights])
  assert_same(sparse, stripped, inputs())


def test_converted_model_saves_and_fine_tunes(tmp_path):
  model = block_prune_model(tf_keras.Sequential([
      L.Input((None, FEATURES)), L.Masking(), L.GRU(16, return_sequences=True),
      L.TimeDistributed(L.Dense(4))]), (4, 4), 0.7)
  sparse = tfbs.to_block_sparse(model)
  path = os.path.join(tmp_path, "converted.keras")
  sparse.save(path)
  loaded = tf_keras.models.load_model(path)
  assert_same(loaded, model, inputs())
  loaded.compile(optimizer="sgd", loss="mse")
  loss = loaded.fit(inputs(), np.zeros([3, 7, 4], np.float32), verbose=0)
  assert np.isfinite(loss.history["loss"][0])


def test_bad_arguments():
  with pytest.raises(TypeError, match="tf_keras Model"):
    tfbs.to_block_sparse(L.Dense(3))

  class Sub(tf_keras.Model):

    def call(self, x):
      return x

  sub = Sub()
  sub(np.zeros([1, 2], np.float32))
  with pytest.raises(TypeError, match="subclassed"):
    tfbs.to_block_sparse(sub)
  model = tf_keras.Sequential([L.Input((4,)), L.Dense(2)])
  with pytest.raises(ValueError, match="min_sparsity"):
    tfbs.to_block_sparse(model, min_sparsity=1.5)
  with pytest.raises(ValueError, match="no Dense/SimpleRNN/GRU/LSTM"):
    tfbs.to_block_sparse(tf_keras.Sequential([L.Input((4,)), L.ReLU()]))


def test_stateful_model_streams_like_the_dense_one():
  model = tf_keras.Sequential([
      L.Input((None, FEATURES), batch_size=3),
      L.LSTM(16, stateful=True, return_sequences=True)])
  block_prune_model(model, (4, 4), 0.7)
  sparse = tfbs.to_block_sparse(model)
  assert type(sparse.layers[0]).__name__ == "BlockSparseLSTM"
  x = inputs()
  for chunk in (x[:, :3], x[:, 3:]):  # the state carries over between calls
    assert_same(sparse, model, chunk)
