"""Callbacks (ours and tfmot's) driving the block pruning wrapper."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers
from tests.pruning import np_blocks


def _model(eager=True):
  layer = tfbs.prune_block_low_magnitude(
      tf_keras.layers.LSTM(4), block_size=(2, 2),
      pruning_schedule=tfbs.schedules.ConstantSparsity(0.5, 0, frequency=1))
  model = tf_keras.Sequential([tf_keras.Input((3, 5)), layer])
  model.compile(helpers.sgd(0.1), "mse", run_eagerly=eager)
  return model, layer


def test_tfmot_callback_and_strip_drive_our_wrapper():
  model, layer = _model()
  helpers.fit_steps(model, 3,
                    callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
  assert int(layer.pruning_step.numpy()) == 3
  stripped = tfmot.sparsity.keras.strip_pruning(model)
  assert type(stripped.layers[0]) is tf_keras.layers.LSTM
  for mw in layer.masked_weights:
    # tfmot re-masked at epoch end: weights are exactly block sparse.
    value = mw.weight.numpy()
    blocks = np_blocks.block_mask_of_values(value, (2, 2), mw.gates)
    assert abs((1 - blocks.mean()) - 0.5) <= 1 / blocks.size + 1e-9
    np_blocks.assert_block_structure(value, (2, 2), mw.gates)
  # tfmot's prune_low_magnitude leaves our wrappers alone.
  again = tfmot.sparsity.keras.prune_low_magnitude(model)
  assert isinstance(again.layers[0], tfbs.pruning.PruneBlockLowMagnitude)


def test_training_without_the_callback_says_what_to_do():
  model, _ = _model(eager=True)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="UpdatePruningStep"):
    helpers.fit_steps(model, 1, callbacks=[])


def test_strip_applies_masks_even_without_epoch_end_remask():
  model, layer = _model()
  helpers.fit_steps(model, 2)
  # move the pruned weights as an optimizer step would
  for mw in layer.masked_weights:
    mw.weight.assign(mw.weight + 0.01)
  stripped = tfbs.strip_block_pruning(model)
  for mw in layer.masked_weights:
    assert not np.any(mw.weight.numpy()[mw.mask.numpy() == 0])
  assert stripped.layers[0] is layer.layer


def _read_scalars(log_dir):
  values = {}
  for path in glob.glob(os.path.join(log_dir, "metrics", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        values.setdefault(v.tag, []).append(
            (event.step, float(tf.make_ndarray(v.tensor))))
  return values


def test_pruning_summaries_write_block_sparsity_and_threshold(tmp_path):
  model, layer = _model()
  log_dir = str(tmp_path)
  x = np.random.RandomState(0).randn(4, 3, 5).astype(np.float32)
  y = np.zeros([4, 4], np.float32)
  model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[
      tfbs.UpdatePruningStep(), tfbs.PruningSummaries(log_dir=log_dir)])
  scalars = _read_scalars(log_dir)
  for mw in layer.masked_weights:
    prefix = f"{layer.name}/{mw.path}"
    # written at the start of epochs 1 and 2 (optimizer steps 0 and 2) and
    # when training ends (step 4), with the state at that moment
    assert [s for s, _ in scalars[prefix + "/block_sparsity"]] == [0, 2, 4]
    assert dict(scalars[prefix + "/block_sparsity"])[0] == 0.0
    blocks = np_blocks.block_mask_of_values(mw.weight.numpy(), (2, 2),
                                            mw.gates)
    assert dict(scalars[prefix + "/block_sparsity"])[4] == pytest.approx(
        1 - blocks.mean())
    assert dict(scalars[prefix + "/element_sparsity"])[4] == pytest.approx(
        1 - mw.mask.numpy().mean())
    assert dict(scalars[prefix + "/threshold"])[4] == pytest.approx(
        float(mw.threshold.numpy()))
    assert dict(scalars[mw.mask.name + "/sparsity"])[4] == pytest.approx(
        1 - mw.mask.numpy().mean())
