"""prune_block_low_magnitude(..., group_lasso=λ): the paper's GLP."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers


def _np_penalty(weights, bs, gates):
  total = 0.0
  for w, g in zip(weights, gates):
    m = w.reshape(-1, w.shape[-1]).astype(np.float64)
    u = m.shape[1] // g
    for s in range(g):
      sl = m[:, s * u:(s + 1) * u]
      for i in range(0, sl.shape[0], bs[0]):
        for j in range(0, sl.shape[1], bs[1]):
          total += np.sqrt((sl[i:i + bs[0], j:j + bs[1]] ** 2).sum())
  return total


def test_penalty_only_inside_the_pruning_window():
  bs = (2, 2)
  schedule = tfbs.schedules.ConstantSparsity(0.5, begin_step=3, end_step=5,
                                             frequency=1)
  layer = tfbs.prune_block_low_magnitude(
      tf_keras.layers.GRU(3), block_size=bs, pruning_schedule=schedule,
      group_lasso=0.1)
  model = tf_keras.Sequential([tf_keras.Input((2, 5)), layer])
  weights = [mw.weight.numpy() for mw in layer.masked_weights]
  want = 0.1 * _np_penalty(weights, bs, [3, 3])
  for step, active in [(-1, False), (2, False), (3, True), (5, True),
                       (6, False)]:
    layer.pruning_step.assign(step)
    got = float(tf.add_n(model.losses))
    assert got == pytest.approx(want if active else 0.0, rel=1e-5), step


def test_penalty_gradient_and_fit_loss():
  bs = (2, 3)
  schedule = tfbs.schedules.GradualThreshold(start_step=1, ramp_step=2,
                                             end_step=3, frequency=1, q=1e-6)
  layer = tfbs.prune_block_low_magnitude(
      tf_keras.layers.Dense(4), block_size=bs, pruning_schedule=schedule,
      group_lasso=0.5)
  model = tf_keras.Sequential([tf_keras.Input((5,)), layer])
  layer.pruning_step.assign(2)
  kernel = layer.layer.kernel
  with tf.GradientTape() as tape:
    penalty = tf.add_n(model.losses)
  grad = tape.gradient(penalty, kernel).numpy()
  w = kernel.numpy()
  want = np.zeros_like(w)
  for i in range(0, 5, 2):
    for j in range(0, 4, 3):
      b = w[i:i + 2, j:j + 3]
      want[i:i + 2, j:j + 3] = 0.5 * b / np.sqrt((b ** 2).sum())
  np.testing.assert_allclose(grad, want, rtol=1e-5)

  # model.fit adds the penalty to the reported training loss (lr = 0).
  layer.pruning_step.assign(-1)
  model.compile(helpers.sgd(0.0), "mse", run_eagerly=True)
  x = np.random.RandomState(0).randn(2, 5).astype(np.float32)
  y = np.zeros([2, 4], np.float32)
  hist = model.fit(x, y, batch_size=2, verbose=0,
                   callbacks=[tfbs.UpdatePruningStep()])   # step 1: inside
  mse = np.mean((x @ layer.layer.kernel.numpy() +
                 layer.layer.bias.numpy()) ** 2)
  pen = 0.5 * _np_penalty([layer.layer.kernel.numpy()], bs, [1])
  assert hist.history["loss"][0] == pytest.approx(mse + pen, rel=1e-5)


def test_group_lasso_needs_a_known_window_and_non_negative_strength():
  with pytest.raises(ValueError, match="group_lasso"):
    tfbs.prune_block_low_magnitude(tf_keras.layers.Dense(2), group_lasso=-1.0)

  class Custom(tfbs.schedules.PruningSchedule):
    def __call__(self, step):
      return tf.constant(True), tf.constant(0.5)

    def get_config(self):
      return {}

  with pytest.raises(ValueError, match="begin_step/end_step"):
    tfbs.prune_block_low_magnitude(tf_keras.layers.Dense(2),
                                   pruning_schedule=Custom(), group_lasso=0.1)
