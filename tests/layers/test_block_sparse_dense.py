"""BlockSparseDense vs tf_keras Dense holding the same (block-pruned) kernel."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from bsr_testing import path_scope


def pruned_dense(units=24, features=20, block=(4, 8), activation="relu"):
  rng = np.random.default_rng(0)
  dense = tf_keras.layers.Dense(units, activation=activation)
  dense.build((None, features))
  k, n = features, units
  keep = rng.random([-(-k // block[0]), -(-n // block[1])]) > 0.6
  kernel = rng.standard_normal([k, n]) * np.kron(keep, np.ones(block))[:k, :n]
  dense.set_weights([kernel.astype(np.float32),
                     rng.standard_normal(n).astype(np.float32)])
  return dense, block


@pytest.mark.parametrize("shape", [(5, 20), (2, 3, 20)])
def test_matches_dense_and_gradients(shape):
  dense, block = pruned_dense()
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  x = tf.constant(np.random.default_rng(1).standard_normal(shape), tf.float32)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    y_s, y_d = sparse(x), dense(x)
    loss_s, loss_d = tf.reduce_sum(y_s ** 2), tf.reduce_sum(y_d ** 2)
  np.testing.assert_allclose(y_s, y_d, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tape.gradient(loss_s, x), tape.gradient(loss_d, x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tape.gradient(loss_s, sparse.bias),
                             tape.gradient(loss_d, dense.bias), rtol=1e-5)
  np.testing.assert_array_equal(sparse.dense_kernel(), dense.kernel)


def test_config_keras_and_savedmodel_round_trip(tmp_path):
  dense, block = pruned_dense()
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  model = tf_keras.Sequential([tf_keras.Input((20,)), sparse])
  x = np.random.default_rng(2).standard_normal([4, 20]).astype(np.float32)
  want = dense(x)
  path = os.path.join(tmp_path, "m.keras")
  model.save(path)
  np.testing.assert_allclose(tf_keras.models.load_model(path)(x), want,
                             rtol=1e-5, atol=1e-6)
  tf.saved_model.save(model, os.path.join(tmp_path, "sm"))
  np.testing.assert_allclose(
      tf.saved_model.load(os.path.join(tmp_path, "sm"))(x), want,
      rtol=1e-5, atol=1e-6)
  config = sparse.get_config()
  assert config["kernel_blocks"] == sparse.kernel.values.shape[0]
  assert config["block_size"] == [4, 8]


def test_from_scratch_and_bad_input():
  layer = tfbs.layers.BlockSparseDense(32, block_size=8, density=0.5)
  y = layer(np.ones([2, 16], np.float32))
  assert layer.kernel.values.shape == (4, 8, 8)  # round(0.5 * 2 * 4) blocks
  np.testing.assert_allclose(y, np.ones([2, 16]) @ layer.dense_kernel().numpy(),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="incompatible"):
    layer(np.ones([2, 5], np.float32))
  with pytest.raises(TypeError, match="dense inputs"):
    layer(tf.ragged.constant([[1.0] * 16, [2.0] * 16]))
  with pytest.raises(ValueError, match="units"):
    tfbs.layers.BlockSparseDense(-1)
  with pytest.raises(ValueError, match="density"):
    tfbs.layers.BlockSparseDense(8, density=2.0)(np.ones([1, 4], np.float32))


# The layer builds its matrix without the eager host-side layout checks; the
# kernels (compiled or fallback) still check whatever layout they are given.
LAYER_PATHS = ("custom", "fallback")


@pytest.mark.parametrize("path", LAYER_PATHS)
@pytest.mark.parametrize("shape", [(5, 20), (1, 20), (2, 3, 20)])
def test_every_call_route_matches_numpy(path, shape):
  dense, block = pruned_dense(activation=None)
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  model = tf_keras.Sequential([tf_keras.Input(shape[1:]), sparse])
  x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
  kernel, bias = (w.numpy() for w in dense.weights)
  want = x @ kernel + bias
  with path_scope(path):
    dynamic = tf.function(sparse.__call__, input_signature=[
        tf.TensorSpec([None] * len(shape[:-1]) + [20], tf.float32)])
    got = [sparse(x), tf.function(sparse.__call__)(x), dynamic(x),
           model.predict_on_batch(x)]
  for y in got:
    assert tuple(y.shape) == shape[:-1] + (24,)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_eager_call_does_no_host_side_layout_checks(monkeypatch):
  dense, block = pruned_dense(activation=None)
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  x = np.ones([2, 20], np.float32)
  want = sparse(x).numpy()

  def forbidden(*args):
    raise AssertionError("check_numpy ran during a layer call")

  monkeypatch.setattr(tfbs.bsr.validation, "check_numpy", forbidden)
  np.testing.assert_allclose(sparse(x), want, rtol=1e-6)
  # A matrix built from components is still checked.
  with pytest.raises(AssertionError, match="check_numpy"):
    sparse.kernel.matrix()


def _bad_layouts(layer):
  """(message, col_indices, row_ptr) variants of the layer's kernel layout."""
  cols, row_ptr = (v.numpy() for v in (layer.kernel.col_indices,
                                       layer.kernel.row_ptr))
  nbc = -(-layer.units // layer.block_size[1])
  out_of_range = cols.copy()
  out_of_range[-1] = nbc
  unsorted = cols.copy()
  row = int(np.argmax(np.diff(row_ptr) >= 2))  # a block row of >= 2 blocks
  first = row_ptr[row]
  unsorted[[first, first + 1]] = unsorted[[first + 1, first]]
  short_end = row_ptr.copy()
  short_end[-1] -= 1
  return [("range", out_of_range, row_ptr),
          ("increasing", unsorted, row_ptr),
          ("number of blocks", cols, short_end)]


@pytest.mark.parametrize("path", LAYER_PATHS)
def test_layout_corrupted_behind_the_layer_is_rejected_at_call(path):
  dense, block = pruned_dense(activation=None)
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  good = sparse.get_weights()
  names = [w.name.split("/")[-1].split(":")[0] for w in sparse.weights]
  x = np.ones([3, 20], np.float32)
  with path_scope(path):
    for message, cols, row_ptr in _bad_layouts(sparse):
      # set_weights writes the variables directly, bypassing BsrWeight.assign.
      bad = {"kernel_col_indices": cols, "kernel_row_ptr": row_ptr}
      sparse.set_weights([bad.get(n, w) for n, w in zip(names, good)])
      with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        sparse(x)
      with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        tf.function(sparse.__call__)(x)
  sparse.set_weights(good)
  np.testing.assert_allclose(sparse(x), dense(x), rtol=1e-5, atol=1e-5)


def test_layout_corrupted_in_a_loaded_savedmodel_is_rejected(tmp_path):
  dense, block = pruned_dense(activation=None)
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  model = tf_keras.Sequential([tf_keras.Input((20,)), sparse])
  path = os.path.join(tmp_path, "sm")
  tf.saved_model.save(model, path)
  loaded = tf.saved_model.load(path)
  x = np.ones([3, 20], np.float32)
  np.testing.assert_allclose(loaded(x), dense(x), rtol=1e-5, atol=1e-5)
  cols = next(v for v in loaded.variables if "col_indices" in v.name)
  _, bad_cols, _ = _bad_layouts(sparse)[0]
  cols.assign(bad_cols)
  with pytest.raises(tf.errors.InvalidArgumentError, match="range"):
    loaded(x)


def test_assign_checks_the_layout_once():
  dense, block = pruned_dense(activation=None)
  sparse = tfbs.layers.BlockSparseDense.from_dense_layer(dense, block)
  m = tfbs.BlockSparseMatrix.from_dense(dense.kernel, block)
  for message, cols, row_ptr in _bad_layouts(sparse):
    bad = types.SimpleNamespace(values=m.values, col_indices=cols,
                                row_ptr=row_ptr)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      sparse.kernel.assign(bad)
  np.testing.assert_array_equal(sparse.dense_kernel(), dense.kernel)
