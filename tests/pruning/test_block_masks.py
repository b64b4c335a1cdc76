"""The block mask arithmetic against plain numpy loops (no Keras)."""

import numpy as np
import pytest
import tensorflow as tf

from tests.pruning import np_blocks
from tf_blocksparse.pruning import block_masks

# (weight shape, block size, gates): whole, partial edges, gated partial,
# a Dense(1) column, a Conv1D kernel.
CASES = [
    ((8, 8), (4, 4), 1),
    ((7, 10), (4, 4), 1),
    ((5, 12), (2, 2), 3),     # GRU units=4, 3 gates
    ((6, 20), (4, 3), 4),     # LSTM units=5, partial in both axes per gate
    ((9, 1), (16, 16), 1),    # Dense(1) with 16x16 blocks
    ((3, 4, 6), (4, 4), 1),   # Conv1D [k, in, out] seen as [12, 6]
]


def _weight(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize("shape,bs,gates", CASES)
@pytest.mark.parametrize("pooling", ["max", "avg", "l2"])
def test_representatives_match_numpy(shape, bs, gates, pooling):
  w = _weight(shape)
  m = w.reshape(-1, shape[-1])
  got = block_masks.representatives(m, bs, pooling, gates).numpy()
  want = np_blocks.representatives(w, bs, pooling, gates)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_partial_blocks_are_judged_like_whole_ones():
  # A 1-row edge block of constant 3 must rank like a whole block of 3s.
  m = np.full([5, 4], 3.0, np.float32)
  for pooling in ("max", "avg", "l2"):
    reps = block_masks.representatives(m, (4, 4), pooling).numpy()[0, :, 0]
    assert reps[0] == pytest.approx(reps[1]), pooling


@pytest.mark.parametrize("shape,bs,gates", CASES)
def test_expand_and_back(shape, bs, gates):
  w = _weight(shape)
  kshape = block_masks.matrix_shape(shape)
  grid = block_masks.block_grid(kshape, bs, gates)
  bmask = np.random.RandomState(1).rand(*grid) > 0.5
  got = block_masks.expand(bmask.astype(np.float32), kshape, bs).numpy()
  want = np_blocks.expand(bmask, kshape, bs, gates)
  np.testing.assert_array_equal(got, want)
  back = block_masks.from_element_mask(got, bs, gates).numpy()
  np.testing.assert_array_equal(back, bmask)
  del w


def test_block_counts_of_partial_blocks():
  counts = block_masks.block_element_counts((5, 12), (2, 3), gates=2)
  # per gate: rows 2,2,1 ; cols of a 6-wide slice: 3,3
  np.testing.assert_array_equal(counts[1], [[6, 6], [6, 6], [3, 3]])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.99])
def test_keep_top_blocks(sparsity):
  reps = np.random.RandomState(2).rand(3, 4, 5).astype(np.float32)
  alive = np.ones_like(reps, bool)
  kept, weakest = block_masks.keep_top_blocks(reps, sparsity, alive)
  want = np_blocks.top_blocks(reps, sparsity)
  np.testing.assert_array_equal(kept.numpy(), want)
  assert float(weakest) == pytest.approx(reps[want].min())
  # n = 60: number pruned = round(60 * s)
  assert int((~kept.numpy()).sum()) == min(int(np.floor(60 * sparsity + .5)),
                                           59)


def test_pruned_blocks_never_come_back():
  reps = np.array([[[5., 4., 3., 2.]]], np.float32)
  alive = np.array([[[False, True, True, True]]])
  kept, _ = block_masks.keep_top_blocks(reps, 0.5, alive)
  # block 0 has the largest rep but was pruned: keep the next two.
  np.testing.assert_array_equal(kept.numpy(), [[[False, True, True, False]]])
  kept = block_masks.keep_above_threshold(reps, 3.0, alive)
  np.testing.assert_array_equal(kept.numpy(), [[[False, True, True, False]]])


def test_percentile_matches_numpy():
  x = np.random.RandomState(3).randn(7, 13).astype(np.float32)
  for q in (0.0, 50.0, 90.0, 100.0):
    assert float(block_masks.percentile(np.abs(x), q)) == pytest.approx(
        np.percentile(np.abs(x), q), rel=1e-6)


def test_block_l2_norm_gradient_is_zero_for_zero_blocks():
  m = tf.Variable(np.array([[0., 0., 3., 4.]], np.float32))
  with tf.GradientTape() as tape:
    total = tf.reduce_sum(block_masks.block_l2_norms(m, (1, 2)))
  grad = tape.gradient(total, m).numpy()
  assert float(total) == pytest.approx(5.0)
  np.testing.assert_allclose(grad, [[0., 0., 0.6, 0.8]], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, (0, 4), (4, -1), (4,), "4x4",
                                 (2.5, 2), None])
def test_bad_block_size(bad):
  with pytest.raises(ValueError, match="block_size"):
    block_masks.check_block_size(bad)


def test_unknown_pooling():
  with pytest.raises(ValueError, match="'max', 'avg', 'l2'"):
    block_masks.check_pooling("median")
  assert block_masks.check_pooling("MAX") == "max"


def test_gates_must_divide_columns():
  with pytest.raises(ValueError, match="gate"):
    block_masks.block_grid((4, 10), (2, 2), gates=4)
