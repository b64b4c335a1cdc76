"""Inputs prune_block_low_magnitude accepts, and the errors it gives."""

import keras  # Keras 3, only to check that it is refused
import numpy as np
import pytest
import tf_keras

import tf_blocksparse as tfbs
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
