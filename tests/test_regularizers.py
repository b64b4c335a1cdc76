"""GroupLasso value and gradient against numpy."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import np_blocks


def _np_group_lasso(w, strength, bs, gates):
  value = 0.0
  as64 = np.asarray(w, np.float64)
  grad = np.zeros_like(as64)
  g_view = grad.reshape(-1, grad.shape[-1])
  k, n = g_view.shape
  u = n // gates
  for g in range(gates):
    for i in range(0, k, bs[0]):
      for j in range(0, u, bs[1]):
        cols = slice(g * u + j, min(g * u + j + bs[1], (g + 1) * u))
        block = as64.reshape(k, n)[i:i + bs[0], cols]
        norm = np.sqrt((block ** 2).sum())
        value += norm
        if norm > 0:
          g_view[i:i + bs[0], cols] = block / norm
  return strength * value, strength * grad


@pytest.mark.parametrize("shape,bs,gates", [
    ((8, 8), (4, 4), 1), ((7, 10), (4, 3), 1), ((5, 20), (2, 2), 4),
    ((3, 4, 6), (4, 4), 1)])
def test_value_and_gradient_match_numpy(shape, bs, gates):
  w = np.random.RandomState(0).randn(*shape).astype(np.float32)
  w.reshape(-1, shape[-1])[:bs[0], :bs[1]] = 0.0   # one all-zero block
  reg = tfbs.regularizers.GroupLasso(0.3, bs, gates=gates)
  var = tf.Variable(w)
  with tf.GradientTape() as tape:
    value = reg(var)
  grad = tape.gradient(value, var).numpy()
  want_value, want_grad = _np_group_lasso(w, 0.3, bs, gates)
  assert float(value) == pytest.approx(want_value, rel=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(grad))


def test_serializable_and_usable_as_layer_regularizers(tmp_path):
  reg = tfbs.regularizers.GroupLasso(0.01, (2, 2), gates=4)
  assert tfbs.regularizers.GroupLasso.from_config(reg.get_config()) \
      .get_config() == reg.get_config()
  again = tf_keras.regularizers.deserialize(
      tf_keras.regularizers.serialize(reg))
  assert isinstance(again, tfbs.regularizers.GroupLasso)
  assert again.get_config() == reg.get_config()

  layer = tf_keras.layers.LSTM(
      3, kernel_regularizer=tfbs.regularizers.GroupLasso(0.01, (2, 2), 4),
      recurrent_regularizer=reg)
  model = tf_keras.Sequential([tf_keras.Input((2, 5)), layer])
  cell = layer.cell
  want = (_np_group_lasso(cell.kernel.numpy(), 0.01, (2, 2), 4)[0] +
          _np_group_lasso(cell.recurrent_kernel.numpy(), 0.01, (2, 2), 4)[0])
  assert float(tf.add_n(model.losses)) == pytest.approx(want, rel=1e-5)
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = tf_keras.models.load_model(path)
  assert isinstance(loaded.layers[0].cell.recurrent_regularizer,
                    tfbs.regularizers.GroupLasso)
  assert float(tf.add_n(loaded.losses)) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=-1.0), "strength"), (dict(block_size=0), "block_size"),
    (dict(block_size=(2, -2)), "block_size"), (dict(gates=0), "gates")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tfbs.regularizers.GroupLasso(**kwargs)


def test_zero_blocks_match_block_structure_reference():
  w = np.zeros([4, 4], np.float32)
  w[2:, 2:] = 1.0
  assert float(tfbs.regularizers.GroupLasso(1.0, 2)(w)) == pytest.approx(2.0)
  assert np_blocks.block_mask_of_values(w, (2, 2)).sum() == 1
