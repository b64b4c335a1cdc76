"""The block-sparse layers trust their stored layout on every call, and the
kernels still reject a layout that was corrupted behind the layer's back."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from bsr_testing import path_scope

L = tf_keras.layers
RNNS = {"lstm": (L.LSTM, tfbs.layers.BlockSparseLSTM),
        "gru": (L.GRU, tfbs.layers.BlockSparseGRU),
        "simple": (L.SimpleRNN, tfbs.layers.BlockSparseSimpleRNN)}
UNITS, FEATURES, BLOCK = 16, 12, 4


def pruned_rnn(kind, seed=0):
  rng = np.random.default_rng(seed)
  layer = RNNS[kind][0](UNITS, return_sequences=True)
  layer.build((None, None, FEATURES))
  weights = layer.get_weights()
  for i in (0, 1):
    k, n = weights[i].shape
    keep = rng.random([k // BLOCK, n // BLOCK]) > 0.5
    weights[i] = weights[i] * np.kron(keep, np.ones([BLOCK, BLOCK]))
  layer.set_weights(weights)
  return layer


def forbid_host_checks(monkeypatch):
  def forbidden(*args):
    raise AssertionError("check_numpy ran during a layer call")
  monkeypatch.setattr(tfbs.bsr.validation, "check_numpy", forbidden)


@pytest.mark.parametrize("sparse_recurrent", [True, False])
@pytest.mark.parametrize("kind", sorted(RNNS))
def test_rnn_call_does_no_host_side_layout_checks(monkeypatch, kind, sparse_recurrent):
  dense = pruned_rnn(kind)
  sparse = RNNS[kind][1].from_dense_layer(dense, BLOCK,
                                          sparse_recurrent=sparse_recurrent)
  x = np.random.default_rng(1).standard_normal([3, 5, FEATURES]).astype(np.float32)
  want = dense(x).numpy()
  forbid_host_checks(monkeypatch)
  np.testing.assert_allclose(sparse(x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tf.function(sparse.__call__)(x), want,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["custom", "fallback"])
@pytest.mark.parametrize("weight", ["kernel", "recurrent_kernel"])
@pytest.mark.parametrize("kind", sorted(RNNS))
def test_rnn_layout_corrupted_behind_the_layer_is_rejected(kind, weight, path):
  dense = pruned_rnn(kind)
  sparse = RNNS[kind][1].from_dense_layer(dense, BLOCK)
  x = np.ones([2, 4, FEATURES], np.float32)
  cols = getattr(sparse.cell, weight).col_indices
  good = cols.numpy()
  bad = good.copy()
  bad[-1] = 10 ** 6  # out of range
  cols.assign(bad)
  with path_scope(path):
    with pytest.raises(tf.errors.InvalidArgumentError):
      sparse(x)
    with pytest.raises(tf.errors.InvalidArgumentError):
      tf.function(sparse.__call__)(x)
  cols.assign(good)
  np.testing.assert_allclose(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
