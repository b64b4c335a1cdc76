"""Save a pruned model mid-training in each format, load it, resume.

The loaded model must hold the same masks, thresholds, q and pruning step,
and training it further must follow the schedule exactly as the original
model does when trained on the same batches.
"""

import os

import numpy as np
import pytest
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers
from tests.pruning import np_blocks

L = tf_keras.layers
BS = (2, 2)


def _model(with_bidirectional=True):
  threshold = tfbs.schedules.GradualThreshold(start_step=1, ramp_step=3,
                                              end_step=7, frequency=2)
  poly = tfbs.schedules.PolynomialDecay(0.0, 0.75, begin_step=1, end_step=7,
                                        frequency=2)
  inp = tf_keras.Input((3, 4))
  x = inp
  if with_bidirectional:
    x = tfbs.prune_block_low_magnitude(
        L.Bidirectional(L.GRU(4, return_sequences=True)), block_size=BS,
        pruning_schedule=threshold, block_pooling="avg")(x)
    x = tfbs.prune_block_low_magnitude(L.LSTM(5), block_size=BS,
                                       pruning_schedule=poly)(x)
  else:  # SavedModel traces every call: keep that case small
    x = tfbs.prune_block_low_magnitude(
        L.GRU(4), block_size=BS, pruning_schedule=threshold,
        block_pooling="avg")(x)
  out = tfbs.prune_block_low_magnitude(L.Dense(2), block_size=BS,
                                       pruning_schedule=poly)(x)
  model = tf_keras.Model(inp, out)
  model.compile(helpers.sgd(0.05), "mse")
  model.run_eagerly = True
  return model


def _wrappers(model):
  return [l for l in model.layers
          if isinstance(l, tfbs.pruning.PruneBlockLowMagnitude)]


def _state(model):
  out = []
  for layer in _wrappers(model):
    out.append(int(layer.pruning_step.numpy()))
    for mw in layer.masked_weights:
      out += [mw.weight.numpy(), mw.mask.numpy(), float(mw.threshold.numpy()),
              float(mw.q.numpy())]
  return out


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["keras", "tf", "h5"])
def test_save_load_resume(tmp_path, fmt):
  model = _model(with_bidirectional=fmt != "tf")
  helpers.fit_steps(model, 4)     # steps 1..4; masks updated at 1 and 3
  assert all(int(l.pruning_step.numpy()) == 4 for l in _wrappers(model))
  path = os.path.join(tmp_path, {"keras": "m.keras", "tf": "saved_model",
                                 "h5": "m.h5"}[fmt])
  model.save(path)   # no extension: tf_keras writes a SavedModel
  if fmt == "tf":
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
  loaded = tf_keras.models.load_model(path)
  loaded.run_eagerly = True
  assert len(_wrappers(loaded)) == len(_wrappers(model)) == (
      2 if fmt == "tf" else 3)
  assert [type(l.layer) for l in _wrappers(loaded)] == \
      [type(l.layer) for l in _wrappers(model)]
  assert isinstance(_wrappers(loaded)[0].pruning_schedule,
                    tfbs.schedules.GradualThreshold)
  _assert_same(_state(loaded), _state(model))

  # Resume both on the same batches: steps 5..8, updates at 5 and 7.
  helpers.fit_steps(model, 4, seed=1)
  helpers.fit_steps(loaded, 4, seed=1)
  _assert_same(_state(loaded), _state(model))
  gru_layer, *poly_layers = _wrappers(loaded)
  for layer in poly_layers:        # PolynomialDecay reached its 0.75
    assert int(layer.pruning_step.numpy()) == 8
    for mw in layer.masked_weights:
      blocks = np_blocks.block_mask_of_values(mw.weight.numpy(), BS, mw.gates)
      assert abs((1 - blocks.mean()) - 0.75) <= 1.0 / blocks.size + 1e-9
  for mw in gru_layer.masked_weights:     # ε(7) from the restored q
    # θ = 2q·2/(2·2 + 3·4) = q/4, φ = 3q/8; ε(7) = (θ·3 + φ·5)/2 · 4^(1/4)
    q = float(mw.q.numpy())
    eps7 = (q / 4 * 3 + 3 * q / 8 * 5) / 2 * np.sqrt(2.0)
    assert float(mw.threshold.numpy()) == pytest.approx(eps7, rel=1e-5)
    np_blocks.assert_block_structure(mw.weight.numpy(), BS, mw.gates)
