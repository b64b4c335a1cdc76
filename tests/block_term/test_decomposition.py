"""Tests of the block-term math (no Keras)."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from tf_blocksparse import block_term
from tf_blocksparse.block_term import decomposition


def _all_factorizations(n, d):
  """Every ordered d-tuple of positive ints with product n (brute force)."""
  divisors = [k for k in range(1, n + 1) if n % k == 0]
  return [t for t in itertools.product(divisors, repeat=d) if math.prod(t) == n]


def _random_bt(rng, ins, outs, ranks, n):
  factors = [rng.normal(size=[n, i, j, r]) for i, j, r in zip(ins, outs, ranks)]
  core = rng.normal(size=[n] + list(ranks))
  return factors, core


def _dense_by_loops(factors, core):
  """W[i, j] from the definition, one entry at a time."""
  ins = [f.shape[1] for f in factors]
  outs = [f.shape[2] for f in factors]
  ranks = [f.shape[3] for f in factors]
  w = np.zeros([math.prod(ins), math.prod(outs)])
  for i_multi in itertools.product(*[range(i) for i in ins]):
    row = np.ravel_multi_index(i_multi, ins)
    for j_multi in itertools.product(*[range(j) for j in outs]):
      col = np.ravel_multi_index(j_multi, outs)
      total = 0.0
      for n in range(core.shape[0]):
        for r_multi in itertools.product(*[range(r) for r in ranks]):
          term = core[(n,) + r_multi]
          for k, (i, j, r) in enumerate(zip(i_multi, j_multi, r_multi)):
            term *= factors[k][n, i, j, r]
          total += term
      w[row, col] = total
  return w


class TestFactorizeShape:

  @pytest.mark.parametrize("n,d,expected", [
      (4096, 3, (16, 16, 16)), (1000, 2, (40, 25)), (7, 2, (7, 1)),
      (1, 3, (1, 1, 1)), (12, 2, (4, 3)), (64, 1, (64,)), (256, 3, (8, 8, 4))])
  def test_hand_cases(self, n, d, expected):
    assert block_term.factorize_shape(n, d) == expected

  @pytest.mark.parametrize("n,d", [(360, 3), (720, 4), (97 * 4, 2), (1024, 5),
                                   (210, 3), (4 * 3 * 64, 3)])
  def test_is_most_balanced_of_all_factorizations(self, n, d):
    got = block_term.factorize_shape(n, d)
    assert len(got) == d and math.prod(got) == n
    assert list(got) == sorted(got, reverse=True)
    best = min(tuple(sorted(t, reverse=True)) for t in _all_factorizations(n, d))
    assert got == best

  @pytest.mark.parametrize("n,d,err", [(0, 2, ValueError), (10, 0, ValueError),
                                       (-4, 2, ValueError), (2.5, 2, TypeError),
                                       (True, 2, TypeError)])
  def test_bad_input(self, n, d, err):
    with pytest.raises(err, match="must be a positive int|must be positive"):
      block_term.factorize_shape(n, d)


class TestCounts:

  def test_parameter_count_matches_hand_formula(self):
    # N * (sum_k I_k J_k R_k + prod_k R_k) with N=3, modes (4,8,2)x(2,3,5),
    # ranks (2,3,4): 3 * (4*2*2 + 8*3*3 + 2*5*4 + 2*3*4) = 3 * 152.
    assert block_term.parameter_count([4, 8, 2], [2, 3, 5], [2, 3, 4], 3) == 456
    assert block_term.parameter_count([16, 16], [8, 8], 4, 1) == (
        16 * 8 * 4 * 2 + 16)

  def test_compression_ratio(self):
    ratio = block_term.compression_ratio([4, 8, 2], [2, 3, 5], [2, 3, 4], 3)
    assert ratio == pytest.approx(64 * 30 / 456)
    # A rank-1 single block of a 1024 x 1024 matrix in (32, 32) modes.
    assert block_term.compression_ratio([32, 32], [32, 32], 1) == pytest.approx(
        1024 * 1024 / (2 * 32 * 32 + 1))

  def test_parameter_count_equals_stored_sizes(self):
    rng = np.random.default_rng(0)
    factors, core = _random_bt(rng, [3, 4], [5, 2], [2, 3], 2)
    stored = sum(f.size for f in factors) + core.size
    assert block_term.parameter_count([3, 4], [5, 2], [2, 3], 2) == stored


class TestCheckShapes:

  def test_normalises(self):
    assert block_term.check_shapes((4, 8), [2, 3], 2, 3) == ((4, 8), (2, 3), (2, 2), 3)

  @pytest.mark.parametrize("args,err,match", [
      (([4, 8], [2, 3, 4], 2, 1), ValueError, "has 2 modes but output_modes"),
      (([4, 8], [2, 3], 0, 1), ValueError, "rank must be positive"),
      (([4, 8], [2, 3], [2, -1], 1), ValueError, r"rank\[1\] must be positive"),
      (([4, 8], [2, 3], [2, 2, 2], 1), ValueError, "rank .* has 3 entries"),
      (([4, 0], [2, 3], 2, 1), ValueError, r"input_modes\[1\] must be positive"),
      (([4, 8], [2, 3], 2, 0), ValueError, "num_blocks must be positive"),
      (([], [], 2, 1), ValueError, "at least one mode"),
      (([4, 8.0], [2, 3], 2, 1), TypeError, r"input_modes\[1\] must be a positive int"),
  ])
  def test_bad_input(self, args, err, match):
    with pytest.raises(err, match=match):
      block_term.check_shapes(*args)


class TestContraction:

  @pytest.mark.parametrize("ins,outs,ranks,n", [
      ([6], [5], [3], 2), ([3, 4], [5, 2], [2, 3], 2),
      ([2, 3, 2], [3, 2, 2], [2, 1, 3], 3), ([2, 2, 2, 2], [1, 3, 2, 2], 2, 1)])
  def test_dense_matches_definition(self, ins, outs, ranks, n):
    ranks = [ranks] * len(ins) if isinstance(ranks, int) else ranks
    factors, core = _random_bt(np.random.default_rng(1), ins, outs, ranks, n)
    got = block_term.block_term_to_dense(factors, core).numpy()
    np.testing.assert_allclose(got, _dense_by_loops(factors, core), rtol=1e-12, atol=1e-13)

  @pytest.mark.parametrize("ins,outs,ranks,n", [
      ([12], [7], [4], 3), ([3, 4], [5, 2], [2, 3], 2),
      ([4, 3, 5], [2, 6, 3], [3, 2, 4], 2), ([2, 3, 2, 2], [3, 1, 2, 4], 2, 4)])
  def test_matmul_equals_x_times_dense(self, ins, outs, ranks, n):
    ranks = [ranks] * len(ins) if isinstance(ranks, int) else ranks
    rng = np.random.default_rng(2)
    factors, core = _random_bt(rng, ins, outs, ranks, n)
    x = rng.normal(size=[2, 3, math.prod(ins)])
    w = _dense_by_loops(factors, core) if math.prod(ins) * math.prod(outs) < 400 \
        else block_term.block_term_to_dense(factors, core).numpy()
    got = block_term.block_term_matmul(x, factors, core)
    assert got.shape == (2, 3, math.prod(outs))
    np.testing.assert_allclose(got, x @ w, rtol=1e-10, atol=1e-12)

  def test_matmul_in_tf_function_with_unknown_batch(self):
    rng = np.random.default_rng(3)
    factors, core = _random_bt(rng, [3, 4], [2, 5], [2, 2], 2)
    factors = [tf.constant(f, tf.float32) for f in factors]
    core = tf.constant(core, tf.float32)
    fn = tf.function(lambda x: block_term.block_term_matmul(x, factors, core),
                     input_signature=[tf.TensorSpec([None, 12], tf.float32)])
    x = rng.normal(size=[5, 12]).astype(np.float32)
    expected = x @ block_term.block_term_to_dense(factors, core).numpy()
    np.testing.assert_allclose(fn(x), expected, rtol=1e-5, atol=1e-5)

  def test_gradients_match_numeric(self):
    rng = np.random.default_rng(4)
    f0, f1 = (rng.normal(size=s) for s in ([2, 3, 2, 2], [2, 2, 3, 3]))
    core = rng.normal(size=[2, 2, 3])
    x = rng.normal(size=[2, 6])
    theoretical, numerical = tf.test.compute_gradient(
        lambda x, a, b, g: block_term.block_term_matmul(x, [a, b], g),
        [x, f0, f1, core], delta=1e-6)
    for t, n in zip(theoretical, numerical):
      np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-8)

  def test_wrong_input_size_names_modes(self):
    rng = np.random.default_rng(5)
    factors, core = _random_bt(rng, [3, 4], [2, 5], [2, 2], 1)
    with pytest.raises(ValueError, match=r"x has 10 features but the input modes \(3, 4\) multiply to 12"):
      block_term.block_term_matmul(np.ones([2, 10]), factors, core)

  def test_inconsistent_parameters(self):
    rng = np.random.default_rng(6)
    factors, core = _random_bt(rng, [3, 4], [2, 5], [2, 2], 1)
    with pytest.raises(ValueError, match="factors\\[1\\] has rank 2 but core mode 2 has 3"):
      block_term.block_term_to_dense(factors, np.ones([1, 2, 3]))
    with pytest.raises(ValueError, match="core must have shape"):
      block_term.block_term_to_dense(factors, np.ones([1, 2]))
    with pytest.raises(ValueError, match="factors\\[0\\] has 1 blocks but core has 2"):
      block_term.block_term_to_dense(factors, np.ones([2, 2, 2]))


class TestGlorotScaling:

  @pytest.mark.parametrize("ins,outs,ranks,n", [
      ([8, 8, 8], [4, 8, 8], 3, 2), ([32, 32], [16, 16], 4, 1),
      ([4, 4, 4, 4], [4, 4, 4, 4], 2, 4)])
  def test_reconstructed_variance_is_glorot(self, ins, outs, ranks, n):
    ins_, outs_, ranks_, n_ = block_term.check_shapes(ins, outs, ranks, n)
    stds, core_std = block_term.glorot_stddevs(ins_, outs_, ranks_, n_)
    target = 2.0 / (math.prod(ins) + math.prod(outs))
    rng = np.random.default_rng(7)
    variances = []
    for _ in range(8):
      factors = [rng.normal(scale=s, size=[n_, i, j, r])
                 for s, i, j, r in zip(stds, ins_, outs_, ranks_)]
      core = rng.normal(scale=core_std, size=[n_] + list(ranks_))
      w = block_term.block_term_to_dense(factors, core).numpy()
      # Each draw is within a factor of 2 of the Glorot std ...
      assert 0.5 < w.std() / math.sqrt(target) < 2.0
      variances.append(w.var())
    # ... and the expected variance (the design target) is matched.
    assert np.mean(variances) == pytest.approx(target, rel=0.35)


def test_docstring_examples():
  import doctest
  result = doctest.testmod(decomposition)
  assert result.attempted > 10 and result.failed == 0
