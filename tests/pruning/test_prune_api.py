"""Inputs prune_block_low_magnitude accepts, and the errors it gives."""

import keras  # Keras 3, only to check that it is refused
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers
from tests.pruning import np_blocks
from tf_blocksparse.pruning import registry

L = tf_keras.layers


def test_registry_paths_and_gates():
  lstm = L.LSTM(3)
  lstm.build((None, 2, 5))
  got = [(w.path, tuple(w.variable.shape), w.gates)
         for w in registry.prunable_weights(lstm)]
  assert got == [("cell_kernel", (5, 12), 4),
                 ("cell_recurrent_kernel", (3, 12), 4)]
  conv = L.Conv1D(4, 3)
  conv.build((None, 7, 2))
  assert [(w.path, tuple(w.variable.shape)) for w in
          registry.prunable_weights(conv)] == [("kernel", (3, 2, 4))]


def test_layer_list_and_single_layer():
  dense, gru = L.Dense(3), L.GRU(2)
  out = tfbs.prune_block_low_magnitude([L.InputLayer((4,)), dense, gru])
  assert [type(l).__name__ for l in out] == [
      "InputLayer", "PruneBlockLowMagnitude", "PruneBlockLowMagnitude"]
  assert out[1].layer is dense and out[2].layer is gru
  single = tfbs.prune_block_low_magnitude(L.Dense(2), name="custom_name")
  assert single.name == "custom_name"
  assert tfbs.prune_block_low_magnitude([single])[0] is single
  assert tfbs.prune_block_low_magnitude(single) is single


def test_custom_layer_with_get_prunable_weights():
  class Twice(L.Layer):
    def build(self, shape):
      self.w = self.add_weight("w", (shape[-1], 6))

    def call(self, x):
      return x @ self.w

    def get_prunable_weights(self):
      return [self.w]

  layer = tfbs.prune_block_low_magnitude(
      Twice(), block_size=(2, 3),
      pruning_schedule=tfbs.schedules.ConstantSparsity(0.5, 0, frequency=1))
  model = tf_keras.Sequential([tf_keras.Input((4,)), layer])
  model.compile("sgd", "mse", run_eagerly=True)
  model.fit(np.ones((2, 4)), np.ones((2, 6)), verbose=0,
            callbacks=[tfbs.UpdatePruningStep()])
  w = layer.layer.w.numpy()
  zero_blocks = sum(np.all(w[i:i + 2, j:j + 3] == 0)
                    for i in (0, 2) for j in (0, 3))
  assert zero_blocks == 2


def test_config_round_trip():
  layer = tfbs.prune_block_low_magnitude(
      L.Bidirectional(L.GRU(3)), block_size=(2, 4), block_pooling="l2",
      group_lasso=0.01,
      pruning_schedule=tfbs.schedules.GradualThreshold(0, 5, 10, 5))
  again = tfbs.pruning.PruneBlockLowMagnitude.from_config(layer.get_config())
  assert again.block_size == (2, 4) and again.block_pooling == "l2"
  assert again.group_lasso == 0.01
  assert again.pruning_schedule == layer.pruning_schedule
  assert isinstance(again.layer, L.Bidirectional)


@pytest.mark.parametrize("block_size", [0, -4, (0, 2), (4, -1)])
def test_bad_block_sizes(block_size):
  with pytest.raises(ValueError, match="block_size must be positive"):
    tfbs.prune_block_low_magnitude(L.Dense(2), block_size=block_size)


def test_unknown_pooling():
  with pytest.raises(ValueError, match="Unknown block_pooling 'median'"):
    tfbs.prune_block_low_magnitude(L.Dense(2), block_pooling="median")


def test_bad_schedules():
  with pytest.raises(ValueError, match="end_step"):
    tfbs.schedules.GradualThreshold(start_step=100, ramp_step=100,
                                    end_step=50)
  with pytest.raises(TypeError, match="PruningSchedule"):
    tfbs.prune_block_low_magnitude(L.Dense(2), pruning_schedule=0.5)


def test_subclassed_model():
  class MyModel(tf_keras.Model):
    def __init__(self):
      super().__init__()
      self.d = L.Dense(2)

    def call(self, x):
      return self.d(x)

  with pytest.raises(ValueError, match="subclassed model"):
    tfbs.prune_block_low_magnitude(MyModel())


def test_unsupported_layer_is_named_and_supported_listed():
  inp = tf_keras.Input((8, 3))
  model = tf_keras.Model(inp, L.EinsumDense("abc,cd->abd", (None, 2),
                                            name="my_einsum")(inp))
  with pytest.raises(ValueError) as err:
    tfbs.prune_block_low_magnitude(model)
  assert "'my_einsum'" in str(err.value) and "EinsumDense" in str(err.value)
  assert "Dense" in str(err.value) and "LSTM" in str(err.value)
  assert "Conv2D" in str(err.value) and "MultiHeadAttention" in str(err.value)
  with pytest.raises(ValueError, match="Bidirectional.*ConvLSTM1D"):
    tfbs.prune_block_low_magnitude(L.Bidirectional(L.ConvLSTM1D(2, 3)))


def test_keras3_model_is_refused_with_advice():
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  with pytest.raises(TypeError, match="tf_keras"):
    tfbs.prune_block_low_magnitude(model)
  with pytest.raises(TypeError, match="tf_keras"):
    tfbs.prune_block_low_magnitude(keras.layers.LSTM(2))


def test_not_a_layer():
  with pytest.raises(TypeError, match="tf_keras layer"):
    tfbs.prune_block_low_magnitude("dense")
  with pytest.raises(TypeError, match="tf_keras model"):
    tfbs.strip_block_pruning(3)


# --- what tfmot's own Keras pruning tests expect of the API -------------

def _const(sparsity=0.5):
  return tfbs.schedules.ConstantSparsity(sparsity, begin_step=0, frequency=1)


def test_list_form_leaves_weightless_layers_alone_and_trains():
  dense, drop, norm = L.Dense(4), L.Dropout(0.5), L.LayerNormalization()
  out = tfbs.prune_block_low_magnitude(
      [dense, drop, norm, L.Dense(2)], block_size=(1, 1),
      pruning_schedule=_const())
  assert out[1] is drop and out[2] is norm
  assert [type(l).__name__ for l in (out[0], out[3])] == [
      "PruneBlockLowMagnitude"] * 2
  model = tf_keras.Sequential([tf_keras.Input((6,))] + out)
  model.compile("sgd", "mse", run_eagerly=True)
  helpers.fit_steps(model, 1)
  assert np.mean(dense.kernel.numpy() == 0) == 0.5


def test_unknown_keyword_arguments_raise_naming_them():
  model = tf_keras.Sequential([tf_keras.Input((3,)), L.Dense(2)])
  with pytest.raises(TypeError, match="'pruning_schedul' \\(did you mean "
                     "'pruning_schedule'\\?\\)"):
    tfbs.prune_block_low_magnitude(model, pruning_schedul=_const())
  with pytest.raises(TypeError, match="'bogus'"):
    tfbs.prune_block_low_magnitude([L.Dense(2)], bogus=1)
  with pytest.raises(TypeError, match="'name'.*single layer"):
    tfbs.prune_block_low_magnitude(model, name="x")
  with pytest.raises(TypeError, match="'block_sise'"):
    tfbs.prune_block_low_magnitude(L.Dense(2), block_sise=(2, 2))
  with pytest.raises(TypeError, match="block_size.*by keyword"):
    tfbs.prune_block_low_magnitude(L.Dense(2), _const())


def test_block_pooling_type_is_tfmots_name_for_block_pooling():
  # the top block has the larger max, the bottom one the larger mean
  w = np.array([[5, .1], [.1, .1], [2, 2], [2, 2]], np.float32)
  masks = {}
  for kwargs in ({"block_pooling": "avg"}, {"block_pooling_type": "AVG"},
                 {"block_pooling_type": "MAX"}):
    layer = tfbs.prune_block_low_magnitude(
        L.Dense(2), block_size=(2, 2), pruning_schedule=_const(), **kwargs)
    model = tf_keras.Sequential([tf_keras.Input((4,)), layer])
    layer.layer.kernel.assign(w)
    model.compile(helpers.sgd(0.0), "mse", run_eagerly=True)
    helpers.fit_steps(model, 1)
    masks[tuple(kwargs.items())[0][1]] = layer.masked_weights[0].mask.numpy()
  for pooling, name in (("avg", "AVG"), ("max", "MAX")):
    want = np_blocks.top_blocks(
        np_blocks.representatives(w, (2, 2), pooling), 0.5)
    np.testing.assert_array_equal(masks[name],
                                  np_blocks.expand(want, w.shape, (2, 2)))
  np.testing.assert_array_equal(masks["avg"], masks["AVG"])
  assert not np.array_equal(masks["AVG"], masks["MAX"])   # really honoured
  with pytest.raises(ValueError, match="disagree"):
    tfbs.prune_block_low_magnitude(L.Dense(2), block_pooling="avg",
                                   block_pooling_type="MAX")
  with pytest.raises(ValueError, match="Unknown block_pooling 'MEDIAN'"):
    tfbs.prune_block_low_magnitude(L.Dense(2), block_pooling_type="MEDIAN")


@pytest.mark.parametrize("form", ["layer", "model"])
@pytest.mark.parametrize("case", ["dense_2_4", "conv2d_1_4_blocks"])
def test_sparsity_m_by_n(form, case):
  if case == "dense_2_4":
    in_shape, make, bs, m_by_n, segment = (8,), lambda: L.Dense(3), (1, 1), \
        (2, 4), None
  else:   # kernel [2, 2, 8, 4]: groups along the 8 input channels of a tap
    in_shape, make, bs, m_by_n, segment = (3, 3, 8), lambda: L.Conv2D(
        4, 2), (2, 2), (1, 4), 4
  schedule = tfbs.schedules.ConstantSparsity(0.9, begin_step=0, frequency=1)
  if form == "layer":
    model = tf_keras.Sequential([tf_keras.Input(in_shape),
                                 tfbs.prune_block_low_magnitude(
                                     make(), block_size=bs,
                                     pruning_schedule=schedule,
                                     sparsity_m_by_n=m_by_n)])
  else:
    model = tfbs.prune_block_low_magnitude(
        tf_keras.Sequential([tf_keras.Input(in_shape), make()]),
        block_size=bs, pruning_schedule=schedule, sparsity_m_by_n=m_by_n)
  layer = model.layers[0]
  assert layer.sparsity_m_by_n == m_by_n
  w0 = layer.masked_weights[0].weight.numpy()
  model.compile(helpers.sgd(0.0), "mse", run_eagerly=True)
  helpers.fit_steps(model, 2)
  mw = layer.masked_weights[0]
  want = np_blocks.m_by_n_blocks(
      np_blocks.representatives(w0, bs, "max"), m_by_n, segment)
  # m of every n blocks pruned, whatever the schedule's 0.9 says
  assert want.mean() == pytest.approx(1 - m_by_n[0] / m_by_n[1])
  np.testing.assert_array_equal(mw.mask.numpy(),
                                np_blocks.expand(want, w0.shape, bs))
  np.testing.assert_array_equal(mw.weight.numpy(), w0 * mw.mask.numpy())
  again = tfbs.pruning.PruneBlockLowMagnitude.from_config(layer.get_config())
  assert again.sparsity_m_by_n == m_by_n


def test_bad_sparsity_m_by_n():
  for bad in ((4, 2), (0, 4), 2, (2.0, 4)):
    with pytest.raises(ValueError, match="sparsity_m_by_n"):
      tfbs.prune_block_low_magnitude(L.Dense(2), sparsity_m_by_n=bad)
  layer = tfbs.prune_block_low_magnitude(L.Conv2D(2, 2), block_size=(3, 1),
                                         sparsity_m_by_n=(2, 4))
  with pytest.raises(ValueError, match="block height 3 does not divide"):
    layer(np.ones((1, 3, 3, 4), np.float32))


def test_pruning_policy():
  class OnlyDense(tfmot.sparsity.keras.PruningPolicy):
    def __init__(self):
      self.checked = []

    def allow_pruning(self, layer):
      return isinstance(layer, L.Dense)

    def ensure_model_supports_pruning(self, model):
      self.checked.append(model)

  model = tf_keras.Sequential([tf_keras.Input((3, 4)), L.LSTM(4),
                               L.Dense(2)])
  policy = OnlyDense()
  pruned = tfbs.prune_block_low_magnitude(model, pruning_policy=policy)
  assert policy.checked == [model]
  assert [type(l).__name__ for l in pruned.layers] == [
      "LSTM", "PruneBlockLowMagnitude"]
  with pytest.raises(TypeError, match="PruningPolicy"):
    tfbs.prune_block_low_magnitude(model, pruning_policy="xnnpack")
  xnnpack = tfmot.sparsity.keras.PruneForLatencyOnXNNPack()
  with pytest.raises(ValueError):   # tfmot's own check runs
    tfbs.prune_block_low_magnitude(model, pruning_policy=xnnpack)


@pytest.mark.parametrize("bs", [(1, 1), (2, 2)])
def test_prunable_layer_weights_of_any_rank(bs):
  class Mixed(tfmot.sparsity.keras.PrunableLayer, L.Layer):
    def build(self, shape):
      self.v = self.add_weight("v", (6,))            # rank 1: one row
      self.t = self.add_weight("t", (2, 3, 4))       # rank 3: [6, 4]

    def call(self, x):
      return x * tf.reduce_sum(self.v) + tf.reduce_sum(self.t)

    def get_prunable_weights(self):
      return [self.v, self.t]

  layer = tfbs.prune_block_low_magnitude(Mixed(), block_size=bs,
                                         pruning_schedule=_const())
  model = tf_keras.Sequential([tf_keras.Input((2,)), layer])
  w0 = [mw.weight.numpy() for mw in layer.masked_weights]
  model.compile(helpers.sgd(0.0), "mse", run_eagerly=True)
  helpers.fit_steps(model, 1)
  for mw, init in zip(layer.masked_weights, w0):
    want = np_blocks.top_blocks(np_blocks.representatives(init, bs, "max"),
                                0.5)
    np.testing.assert_array_equal(mw.mask.numpy(),
                                  np_blocks.expand(want, init.shape, bs))
  assert layer.layer.get_prunable_weights() == [layer.layer.v, layer.layer.t]


def test_wrapped_layers_answer_get_prunable_weights():
  lstm = L.LSTM(3)
  wrapper = tfbs.prune_block_low_magnitude(lstm)
  wrapper.build((None, 2, 5))
  assert wrapper.layer.get_prunable_weights() == [lstm.cell.kernel,
                                                  lstm.cell.recurrent_kernel]
  # rewrapping keeps LSTM's gates (the method does not hide the table)
  again = tfbs.prune_block_low_magnitude(lstm)
  again.build((None, 2, 5))
  assert [mw.gates for mw in again.masked_weights] == [4, 4]


def test_masked_sequence_labelling_model():
  inp = tf_keras.Input((None, 3))
  x = L.Masking(0.0)(inp)
  x = L.LSTM(4, return_sequences=True)(x)
  out = L.Dense(2)(x)
  pruned = tfbs.prune_block_low_magnitude(
      tf_keras.Model(inp, out), block_size=(2, 2), pruning_schedule=_const())
  pruned.compile("sgd", "mse")
  rng = np.random.RandomState(0)
  x = rng.randn(4, 5, 3).astype(np.float32)
  x[:, 3:] = 0.0
  pruned.fit(x, rng.randn(4, 5, 2).astype(np.float32), verbose=0,
             callbacks=[tfbs.UpdatePruningStep()])
  dense = pruned.layers[-1]
  assert np.mean(dense.masked_weights[0].mask.numpy() == 0) == 0.5
  # the mask reached the LSTM: padded steps repeat the last real output
  y = pruned(x, training=False).numpy()
  np.testing.assert_allclose(y[:, 3], y[:, 2], rtol=1e-6)
  np.testing.assert_allclose(y[:, 4], y[:, 2], rtol=1e-6)


def test_a_weightless_layer_wrapped_alone_prunes_nothing():
  wrapper = tfbs.prune_block_low_magnitude(L.Dropout(0.4))
  model = tf_keras.Sequential([tf_keras.Input((3,)), wrapper])
  model.compile("sgd", "mse", run_eagerly=True)
  helpers.fit_steps(model, 1)
  assert wrapper.masked_weights == [] and int(wrapper.pruning_step) == 1
  assert wrapper.layer.get_prunable_weights() == []
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.testing.assert_array_equal(model(x, training=False).numpy(), x)
