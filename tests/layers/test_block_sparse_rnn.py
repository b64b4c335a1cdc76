"""BlockSparseSimpleRNN/GRU/LSTM vs tf_keras layers holding the same weights."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs

L = tf_keras.layers
KINDS = {
    "lstm": (L.LSTM, tfbs.layers.BlockSparseLSTM, {}),
    "gru": (L.GRU, tfbs.layers.BlockSparseGRU, {"reset_after": True}),
    "gru_before": (L.GRU, tfbs.layers.BlockSparseGRU, {"reset_after": False}),
    "simple": (L.SimpleRNN, tfbs.layers.BlockSparseSimpleRNN, {}),
}
UNITS, FEATURES, BLOCK = 16, 12, 4


def block_prune(rng, w, block, sparsity):
  k, n = w.shape
  keep = rng.random([-(-k // block), -(-n // block)]) >= sparsity
  return (w * np.kron(keep, np.ones([block, block]))[:k, :n]).astype(w.dtype)


def pruned_dense(kind, seed=0, **options):
  """A built tf_keras layer with block-pruned kernels and a random bias."""
  dense_cls, _, extra = KINDS[kind]
  rng = np.random.default_rng(seed)
  layer = dense_cls(UNITS, **extra, **options)
  layer.build((2 if options.get("stateful") else None, None, FEATURES))
  weights = layer.get_weights()
  weights[0] = block_prune(rng, weights[0], BLOCK, 0.6)
  weights[1] = block_prune(rng, weights[1], BLOCK, 0.6)
  if len(weights) > 2:
    weights[2] = rng.standard_normal(weights[2].shape).astype(np.float32) * 0.3
  layer.set_weights(weights)
  return layer


def inputs(seed=1, batch=3, time=7):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal([batch, time, FEATURES]).astype(np.float32)
  x[0, 5:] = 0.0  # padding, masked by Masking
  x[1, :2] = 0.0  # leading padding
  return x


def assert_close(got, want):
  for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("options", [
    {"return_sequences": True},
    {"return_state": True, "go_backwards": True},
    {"return_sequences": True, "return_state": True, "use_bias": False},
])
def test_matches_tf_keras(kind, options):
  dense = pruned_dense(kind, **options)
  sparse = KINDS[kind][1].from_dense_layer(dense, BLOCK)
  for ours, theirs in ((sparse.cell.kernel, dense.cell.kernel),
                       (sparse.cell.recurrent_kernel, dense.cell.recurrent_kernel)):
    w = np.asarray(theirs)
    k, n = w.shape
    nonzero_blocks = np.abs(w).reshape(k // BLOCK, BLOCK, n // BLOCK,
                                       BLOCK).sum(axis=(1, 3)) > 0
    assert ours.values.shape[0] == nonzero_blocks.sum() < nonzero_blocks.size
  x = inputs()
  assert_close(sparse(x), dense(x))
  # With a mask (padded steps keep the state and repeat the output).
  masking = L.Masking()
  assert_close(sparse(x, mask=masking.compute_mask(x)),
               dense(x, mask=masking.compute_mask(x)))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_state_and_fallback_path(kind):
  dense = pruned_dense(kind, return_sequences=True)
  sparse = KINDS[kind][1].from_dense_layer(dense, BLOCK)
  rng = np.random.default_rng(2)
  states = [tf.constant(rng.standard_normal([3, UNITS]), tf.float32)
            for _ in range(2 if kind == "lstm" else 1)]
  x = inputs()
  want = dense(x, initial_state=states)
  assert_close(sparse(x, initial_state=states), want)
  with tfbs.ops.use_custom_ops(False):
    assert_close(sparse(x, initial_state=states), want)


def test_stateful_streaming_matches_tf_keras():
  dense = pruned_dense("lstm", stateful=True, return_sequences=True)
  sparse = tfbs.layers.BlockSparseLSTM.from_dense_layer(dense, BLOCK)
  dense.reset_states()
  x = inputs(batch=2, time=4)
  for chunk in (x, x[:, ::-1].copy()):
    assert_close(sparse(chunk), dense(chunk))
  sparse.reset_states()
  dense.reset_states()
  assert_close(sparse(x), dense(x))


@pytest.mark.parametrize("merge_mode", ["concat", "sum"])
def test_bidirectional_matches_tf_keras(merge_mode):
  fwd = pruned_dense("gru", seed=3, return_sequences=True)
  bwd = pruned_dense("gru", seed=4, return_sequences=True, go_backwards=True)
  dense = L.Bidirectional(fwd, backward_layer=bwd, merge_mode=merge_mode)
  x = inputs()
  mask = L.Masking().compute_mask(x)
  want = dense(x, mask=mask)
  sparse = L.Bidirectional(
      tfbs.layers.BlockSparseGRU.from_dense_layer(dense.forward_layer, BLOCK),
      backward_layer=tfbs.layers.BlockSparseGRU.from_dense_layer(
          dense.backward_layer, BLOCK), merge_mode=merge_mode)
  sparse(x[:1])  # builds the recreated forward layer
  sparse.forward_layer.set_weights(
      tfbs.layers.BlockSparseGRU.from_dense_layer(
          dense.forward_layer, BLOCK).get_weights())
  assert_close(sparse(x, mask=mask), want)


@pytest.mark.parametrize("kind", ["lstm", "gru_before", "simple"])
def test_gradients_match_tf_keras(kind):
  dense = pruned_dense(kind, return_sequences=True)
  sparse = KINDS[kind][1].from_dense_layer(dense, BLOCK)
  x = tf.constant(inputs())
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    loss_d = tf.reduce_sum(dense(x) ** 2)
    loss_s = tf.reduce_sum(sparse(x) ** 2)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
  np.testing.assert_allclose(tape.gradient(loss_s, x), tape.gradient(loss_d, x),
                             rtol=1e-4, atol=1e-5)
  cell = sparse.cell
  g_rec = tape.gradient(loss_s, cell.recurrent_kernel.values)
  g_dense = tape.gradient(loss_d, dense.cell.recurrent_kernel)
  mat = cell.recurrent_kernel.matrix()
  want = tfbs.BlockSparseMatrix.from_mask(
      g_dense, _mask_of(mat), BLOCK).values
  np.testing.assert_allclose(g_rec, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tape.gradient(loss_s, cell.bias),
                             tape.gradient(loss_d, dense.cell.bias),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_masked_backward_gradients_match_tf_keras_in_function(kind):
  """The training-step gradients (graph mode), masked and go_backwards."""
  dense = pruned_dense(kind, return_sequences=True, go_backwards=True)
  sparse = KINDS[kind][1].from_dense_layer(dense, BLOCK)
  x = tf.constant(inputs())
  mask = L.Masking().compute_mask(x)

  def gradients(layer, weights):
    @tf.function
    def run():
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, mask=mask) ** 2)
      return loss, tape.gradient(loss, [x, *weights])
    return run()

  cell = sparse.cell
  loss_s, (g_x, g_rec, g_bias) = gradients(
      sparse, [cell.recurrent_kernel.values, cell.bias])
  loss_d, (w_x, w_rec, w_bias) = gradients(
      dense, [dense.cell.recurrent_kernel, dense.cell.bias])
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5)
  np.testing.assert_allclose(g_x, w_x, rtol=1e-4, atol=1e-5)
  want = tfbs.BlockSparseMatrix.from_mask(
      w_rec, _mask_of(cell.recurrent_kernel.matrix()), BLOCK).values
  np.testing.assert_allclose(g_rec, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g_bias, w_bias, rtol=1e-4, atol=1e-5)


def _mask_of(matrix):
  nbr, nbc = matrix.block_grid
  mask = np.zeros([nbr, nbc], bool)
  rows = matrix.row_ids().numpy()
  mask[rows, matrix.col_indices.numpy()] = True
  return mask


def test_fit_keeps_layout_and_trains_values():
  dense = pruned_dense("lstm")
  sparse = tfbs.layers.BlockSparseLSTM.from_dense_layer(dense, BLOCK)
  model = tf_keras.Sequential([L.Input((None, FEATURES)), sparse, L.Dense(1)])
  model.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
  layout = [sparse.cell.recurrent_kernel.col_indices.numpy(),
            sparse.cell.recurrent_kernel.row_ptr.numpy()]
  before = sparse.cell.recurrent_kernel.values.numpy()
  x = inputs()
  model.fit(x, np.ones([3, 1], np.float32), epochs=1, verbose=0)
  np.testing.assert_array_equal(sparse.cell.recurrent_kernel.col_indices, layout[0])
  np.testing.assert_array_equal(sparse.cell.recurrent_kernel.row_ptr, layout[1])
  assert not np.allclose(sparse.cell.recurrent_kernel.values, before)
  assert len(sparse.trainable_weights) == 3  # kernel/recurrent values, bias


def test_from_scratch_density_and_config_round_trip():
  layer = tfbs.layers.BlockSparseGRU(32, block_size=8, density=0.25,
                                     return_sequences=True, reset_after=False)
  x = inputs()
  y = layer(x)
  assert y.shape == (3, 7, 32)
  mat = layer.cell.recurrent_kernel.matrix()
  assert int(mat.num_blocks) == round(0.25 * 4 * 12)
  clone = tfbs.layers.BlockSparseGRU.from_config(layer.get_config())
  clone(x)
  clone.set_weights(layer.get_weights())
  assert_close(clone(x), y)
  # The dense twin with the block weights computes the same.
  dense = L.GRU(32, return_sequences=True, reset_after=False)
  dense.build((None, None, FEATURES))
  dense.set_weights([layer.cell.dense_kernel(), layer.cell.dense_recurrent_kernel(),
                     layer.cell.bias])
  assert_close(y, dense(x))


@pytest.mark.parametrize("fmt", ["keras", "tf_keras_savedmodel", "tf_savedmodel"])
def test_save_and_load(tmp_path, fmt):
  fwd = pruned_dense("lstm", return_sequences=True)
  # tf.saved_model.load runs the traced functions without Keras, and those
  # drop a Masking layer's mask for RNN subclasses (tf_keras' own
  # RNN(LSTMCell) behaves the same), so that case is tested without one.
  masking = [L.Masking()] if fmt != "tf_savedmodel" else []
  model = tf_keras.Sequential([L.Input((None, FEATURES))] + masking + [
      L.Bidirectional(tfbs.layers.BlockSparseLSTM.from_dense_layer(fwd, BLOCK)),
      tfbs.layers.BlockSparseSimpleRNN(8, density=0.5, block_size=4)])
  x = inputs()
  want = model(x)
  if fmt == "tf_savedmodel":
    path = os.path.join(tmp_path, "sm")
    tf.saved_model.save(model, path)
    got = tf.saved_model.load(path)(x)
  else:
    path = os.path.join(tmp_path, "m.keras" if fmt == "keras" else "sm_keras")
    model.save(path, save_format=None if fmt == "keras" else "tf")
    loaded = tf_keras.models.load_model(path)
    assert type(loaded.layers[-1]).__name__ == "BlockSparseSimpleRNN"
    got = loaded(x)
  assert_close(got, want)


def test_bad_inputs_give_clear_errors():
  layer = tfbs.layers.BlockSparseLSTM(UNITS, density=0.5, block_size=4)
  x = inputs()
  layer(x)
  with pytest.raises(ValueError, match="ragged inputs are not supported"):
    layer(tf.RaggedTensor.from_row_lengths(x.reshape(-1, FEATURES), [7, 7, 7]))
  with pytest.raises(ValueError, match="incompatible"):
    layer(x[..., :5])
  with pytest.raises(ValueError, match="ndim=3"):
    layer(x[0])
  with pytest.raises(ValueError, match=r"initial state 1 must have shape"):
    layer(x, initial_state=[tf.zeros([3, UNITS]), tf.zeros([3, 5])])
  with pytest.raises(ValueError, match="states"):
    layer(x, initial_state=[tf.zeros([3, UNITS])])
  with pytest.raises(ValueError, match="dropout"):
    tfbs.layers.BlockSparseLSTM(4, dropout=0.2)
  with pytest.raises(ValueError, match="units"):
    tfbs.layers.BlockSparseGRU(0)
