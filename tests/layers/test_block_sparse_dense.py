"""BlockSparseDense vs tf_keras Dense holding the same (block-pruned) kernel."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs


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
