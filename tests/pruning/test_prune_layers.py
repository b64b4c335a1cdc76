"""Training each supported layer kind with model.fit, masks checked exactly.

Phase 1 trains with learning rate 0, so the weights the masks are computed
from are the initial ones: the block mask must equal a numpy top-k (or
threshold) over numpy block representatives, and kept blocks must be
bit-identical to the initial weights. Phase 2 trains for real and checks
that pruned blocks stay zero.

Most kinds train eagerly (`run_eagerly=True`) to keep the suite fast; the
kinds in `GRAPH_KINDS` go through fit's compiled `tf.function`, where the
mask assignment must be ordered before the RNN loop reads its kernels.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers
from tests.pruning import np_blocks

L = tf_keras.layers

# name: (input shape, layer factory, block size, pooling)
KINDS = {
    "dense": ((6,), lambda: L.Dense(10), (4, 4), "max"),
    "dense1_16x16": ((40,), lambda: L.Dense(1), (16, 16), "max"),
    "conv1d": ((5, 3), lambda: L.Conv1D(6, 3), (4, 2), "avg"),
    "simple_rnn": ((4, 6), lambda: L.SimpleRNN(6), (2, 2), "l2"),
    "gru": ((4, 6), lambda: L.GRU(5), (2, 2), "max"),
    "lstm": ((4, 6), lambda: L.LSTM(5, return_sequences=True), (4, 4), "avg"),
    "bidirectional": ((4, 6), lambda: L.Bidirectional(L.LSTM(4)), (2, 2),
                      "max"),
    "stacked_cells": ((4, 6), lambda: L.RNN(L.StackedRNNCells(
        [L.GRUCell(4), L.LSTMCell(3)])), (2, 2), "l2"),
    "time_distributed": ((4, 6), lambda: L.TimeDistributed(L.Dense(5)), (2, 2),
                         "max"),
}

# Weights each kind must prune, with their gate count.
EXPECTED_WEIGHTS = {
    "dense": [("kernel", 1)],
    "dense1_16x16": [("kernel", 1)],
    "conv1d": [("kernel", 1)],
    "simple_rnn": [("cell_kernel", 1), ("cell_recurrent_kernel", 1)],
    "gru": [("cell_kernel", 3), ("cell_recurrent_kernel", 3)],
    "lstm": [("cell_kernel", 4), ("cell_recurrent_kernel", 4)],
    "bidirectional": [("forward_cell_kernel", 4),
                      ("forward_cell_recurrent_kernel", 4),
                      ("backward_cell_kernel", 4),
                      ("backward_cell_recurrent_kernel", 4)],
    "stacked_cells": [("cell_cell0_kernel", 3),
                      ("cell_cell0_recurrent_kernel", 3),
                      ("cell_cell1_kernel", 4),
                      ("cell_cell1_recurrent_kernel", 4)],
    "time_distributed": [("inner_kernel", 1)],
}


GRAPH_KINDS = ("bidirectional", "dense")


def _build(kind, schedule, lr=0.0):
  in_shape, make, bs, pooling = KINDS[kind]
  pruned = tfbs.prune_block_low_magnitude(
      make(), block_size=bs, pruning_schedule=schedule, block_pooling=pooling)
  model = tf_keras.Sequential([tf_keras.Input(in_shape), pruned])
  model.compile(helpers.sgd(lr), "mse", run_eagerly=kind not in GRAPH_KINDS)
  return model, pruned, bs, pooling


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_sparsity_mode_with_fit(kind):
  sparsity = 0.5
  model, pruned, bs, pooling = _build(
      kind, tfbs.schedules.ConstantSparsity(sparsity, begin_step=0,
                                            frequency=1))
  got = [(mw.path, mw.gates) for mw in pruned.masked_weights]
  assert got == EXPECTED_WEIGHTS[kind]
  biases = [w for w in pruned.layer.weights if "bias" in w.name]
  bias0 = [b.numpy() for b in biases]
  w0 = [mw.weight.numpy() for mw in pruned.masked_weights]

  helpers.fit_steps(model, 2)
  assert int(pruned.pruning_step.numpy()) == 2
  for mw, init in zip(pruned.masked_weights, w0):
    value = mw.weight.numpy()
    reps = np_blocks.representatives(init, bs, pooling, mw.gates)
    want = np_blocks.top_blocks(reps, sparsity)
    got_blocks = np_blocks.block_mask_of_values(value, bs, mw.gates)
    np.testing.assert_array_equal(got_blocks, want, err_msg=mw.path)
    np.testing.assert_array_equal(
        mw.mask.numpy(), np_blocks.expand(want, value.shape, bs, mw.gates))
    # every block is all zero or untouched (lr = 0: equal to the initial)
    keep = np_blocks.expand(want, value.shape, bs, mw.gates).astype(bool)
    np.testing.assert_array_equal(value[keep], init[keep])
    assert not np.any(value[~keep])
    n = want.size
    assert abs((1 - want.mean()) - sparsity) <= 1.0 / n + 1e-9
    # the recorded threshold is the weakest kept block's representative
    assert float(mw.threshold.numpy()) == pytest.approx(reps[want].min(),
                                                        rel=1e-5)
  for b, b0 in zip(biases, bias0):   # biases are never pruned
    np.testing.assert_array_equal(b.numpy(), b0)

  # Phase 2: real training; pruned blocks stay zero, kept ones move.
  masks = [mw.mask.numpy() for mw in pruned.masked_weights]
  helpers.set_lr(model, 0.05)
  helpers.fit_steps(model, 3, seed=1)
  moved = 0
  for mw, mask, init in zip(pruned.masked_weights, masks, w0):
    value = mw.weight.numpy()
    np.testing.assert_array_equal(mw.mask.numpy(), mask)
    assert not np.any(value[mask == 0])
    np_blocks.assert_block_structure(value, bs, mw.gates)
    moved += np.sum(value[mask == 1] != init[mask == 1])
  assert moved > 0

  # Stripping leaves the same function with the zeros in the plain layer.
  x = np.random.RandomState(5).randn(3, *model.input_shape[1:]).astype(
      np.float32)
  before = model(x, training=False).numpy()
  stripped = tfbs.strip_block_pruning(model)
  assert type(stripped.layers[0]) is type(pruned.layer)
  np.testing.assert_allclose(stripped(x, training=False).numpy(), before,
                             rtol=1e-5, atol=1e-6)


def test_threshold_mode_with_fit():
  # start=1, ramp=5, end=7, freq=2 -> masks updated at steps 1, 3, 5, 7.
  # θ = 2·q·2 / (2·4 + 3·2) = 2q/7, φ = 3q/7; 2x2 blocks scale by 4^(1/4).
  schedule = tfbs.schedules.GradualThreshold(start_step=1, ramp_step=5,
                                             end_step=7, frequency=2)
  bs = (2, 2)
  pruned = tfbs.prune_block_low_magnitude(
      tf_keras.layers.LSTM(6), block_size=bs, pruning_schedule=schedule,
      block_pooling="avg")
  model = tf_keras.Sequential([tf_keras.Input((3, 8)), pruned])
  model.compile(helpers.sgd(0.0), "mse", run_eagerly=True)
  w0 = [mw.weight.numpy() for mw in pruned.masked_weights]
  scale = np.sqrt(2.0)

  helpers.fit_steps(model, 4)   # steps 1..4: updates at 1 and 3
  for mw, init in zip(pruned.masked_weights, w0):
    q = np.percentile(np.abs(init), 90)
    assert float(mw.q.numpy()) == pytest.approx(q, rel=1e-5)
    eps3 = (2 * q / 7) * 3 / 2 * scale           # θ·(3 − 1 + 1)/freq
    assert float(mw.threshold.numpy()) == pytest.approx(eps3, rel=1e-5)
    reps = np_blocks.representatives(init, bs, "avg", mw.gates)
    want = reps >= eps3
    assert 0 < want.mean() < 1
    np.testing.assert_array_equal(
        np_blocks.block_mask_of_values(mw.weight.numpy(), bs, mw.gates), want)
  phase1 = [pruned.pruning_obj.block_mask(mw).numpy()
            for mw in pruned.masked_weights]

  helpers.set_lr(model, 0.05)
  helpers.fit_steps(model, 3, seed=1)   # steps 5..7: updates at 5 and 7
  phase2 = []
  for mw, before in zip(pruned.masked_weights, phase1):
    q = float(mw.q.numpy())
    eps7 = (2 * q / 7 * 5 + 3 * q / 7 * 3) / 2 * scale
    assert float(mw.threshold.numpy()) == pytest.approx(eps7, rel=1e-5)
    now = pruned.pruning_obj.block_mask(mw).numpy()
    assert not np.any(now & ~before)          # never come back
    assert now.sum() < before.sum()           # the threshold rose
    np_blocks.assert_block_structure(mw.weight.numpy(), bs, mw.gates)
    phase2.append(now)

  helpers.fit_steps(model, 3, seed=2)   # steps 8..10: past end, frozen
  assert int(pruned.pruning_step.numpy()) == 10
  for mw, before in zip(pruned.masked_weights, phase2):
    np.testing.assert_array_equal(pruned.pruning_obj.block_mask(mw).numpy(),
                                  before)
    assert not np.any(mw.weight.numpy()[mw.mask.numpy() == 0])


def test_whole_functional_model_with_polynomial_decay():
  inp = tf_keras.Input((5, 4))
  x = L.Bidirectional(L.GRU(4, return_sequences=True))(inp)
  x = L.Dropout(0.1)(x)
  x = L.LayerNormalization()(x)
  x = L.LSTM(6)(x)
  out = L.Dense(3)(x)
  model = tf_keras.Model(inp, out)
  w_before = model.layers[1].forward_layer.cell.kernel.numpy()
  schedule = tfbs.schedules.PolynomialDecay(0.0, 0.75, begin_step=1,
                                            end_step=5, frequency=1)
  pruned = tfbs.prune_block_low_magnitude(model, block_size=(2, 2),
                                          pruning_schedule=schedule)
  kinds = [type(l).__name__ for l in pruned.layers]
  assert kinds == ["InputLayer", "PruneBlockLowMagnitude", "Dropout",
                   "LayerNormalization", "PruneBlockLowMagnitude",
                   "PruneBlockLowMagnitude"]
  # the clone shares the original (trained) weights
  np.testing.assert_array_equal(
      pruned.layers[1].layer.forward_layer.cell.kernel.numpy(), w_before)
  pruned.compile(helpers.sgd(0.01), "mse", run_eagerly=True)
  helpers.fit_steps(pruned, 6)
  for layer in pruned.layers:
    if isinstance(layer, tfbs.pruning.PruneBlockLowMagnitude):
      for mw in layer.masked_weights:
        blocks = layer.pruning_obj.block_mask(mw).numpy()
        n = blocks.size
        assert abs((1 - blocks.mean()) - 0.75) <= 1.0 / n + 1e-9
        np_blocks.assert_block_structure(mw.weight.numpy(), (2, 2), mw.gates)


@pytest.mark.parametrize("kind", ["lstm", "bidirectional"])
def test_masks_apply_before_the_rnn_reads_its_kernels_in_tf_function(kind):
  model, pruned, _, _ = _build(
      kind, tfbs.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1))
  helpers.fit_steps(model, 1)
  x = np.random.RandomState(4).randn(2, *model.input_shape[1:]).astype(
      np.float32)
  # As if an optimizer step had moved the pruned weights:
  for mw in pruned.masked_weights:
    mw.weight.assign(mw.weight + 0.5)
  unmasked = pruned.layer(x).numpy()
  out = tf.function(lambda t: model(t, training=False))(x).numpy()
  masked = pruned.layer(x).numpy()   # weights now hold weight * mask
  assert not np.allclose(out, unmasked, atol=1e-3)
  np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-6)


def test_keras_masks_pass_through_the_wrapper():
  schedule = tfbs.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
  model = tf_keras.Sequential([
      tf_keras.Input((None,), dtype="int32"),
      L.Embedding(6, 3, mask_zero=True),
      tfbs.prune_block_low_magnitude(L.LSTM(4, return_sequences=True),
                                     block_size=(2, 2),
                                     pruning_schedule=schedule),
      tfbs.prune_block_low_magnitude(L.GRU(2), block_size=(2, 2),
                                     pruning_schedule=schedule)])
  model.compile(helpers.sgd(0.01), "mse", run_eagerly=True)
  model.fit(np.array([[1, 2, 3, 0]] * 2), np.zeros([2, 2]), verbose=0,
            callbacks=[tfbs.UpdatePruningStep()])
  padded = model(np.array([[4, 5, 0, 0]]), training=False).numpy()
  short = model(np.array([[4, 5]]), training=False).numpy()
  np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-6)
