"""Fused sequence ops vs an independent numpy recurrence, both paths."""

import numpy as np
import pytest
import tensorflow as tf

import tf_blocksparse as tfbs
from tf_blocksparse.ops import _loader
from tf_blocksparse.ops import bsr_rnn

from bsr_testing import PATHS, numpy_rnn, path_scope, random_block_sparse
from bsr_testing import sigmoid as _sig

GATES = {"lstm": 4, "gru": 3, "gru_before": 3, "simple": 1}


def _run(kind, x, states, rec, rbias=None, **kw):
  if kind == "lstm":
    out, h, c = tfbs.ops.lstm_sequence(x, states[0], states[1], rec, **kw)
    return out, [h, c]
  if kind == "simple":
    out, h = tfbs.ops.simple_rnn_sequence(x, states[0], rec, **kw)
    return out, [h]
  out, h = tfbs.ops.gru_sequence(x, states[0], rec, recurrent_bias=rbias,
                                 reset_after=kind == "gru", **kw)
  return out, [h]


def _case(kind, units, block, seed=0, batch=3, time=6):
  rng = np.random.default_rng(seed)
  g = GATES[kind]
  u, _ = random_block_sparse(rng, units, g * units, block, density=0.5)
  u *= 0.4
  x = rng.standard_normal([batch, time, g * units]).astype(np.float32)
  states = [rng.standard_normal([batch, units]).astype(np.float32)
            for _ in range(2 if kind == "lstm" else 1)]
  mask = rng.random([batch, time]) > 0.3
  mask[0, :2] = False  # masked first steps: the output is zeros, not h0
  rbias = (rng.standard_normal(3 * units).astype(np.float32)
           if kind == "gru" else None)
  return u, x, states, mask, rbias


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", sorted(GATES))
@pytest.mark.parametrize("units,block", [(16, (8, 8)), (12, (8, 8)),
                                         (10, (4, 1))])
def test_matches_numpy(path, kind, units, block):
  u, x, states, mask, rbias = _case(kind, units, block)
  rec = tfbs.BlockSparseMatrix.from_dense(u, block)
  for go_backwards, zero_out, use_mask in [(False, False, True),
                                           (True, True, True),
                                           (True, False, False)]:
    m = mask if use_mask else None
    want_out, want_states = numpy_rnn(kind, x, states, u, rbias, m,
                                      go_backwards, zero_out)
    with path_scope(path):
      out, got_states = _run(kind, x, states, rec, rbias, mask=m,
                             go_backwards=go_backwards,
                             zero_output_for_mask=zero_out)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
    for got, want in zip(got_states, want_states):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("act", ["relu", "linear", "hard_sigmoid", "sigmoid"])
def test_other_activations_match_numpy(act):
  fns = {"relu": lambda v: np.maximum(v, 0), "linear": lambda v: v,
         "hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0, 1),
         "sigmoid": _sig}
  u, x, states, mask, _ = _case("lstm", 16, (4, 4), seed=3)
  rec = tfbs.BlockSparseMatrix.from_dense(u * 0.5, 4)
  want, _ = numpy_rnn("lstm", x, states, u * 0.5, None, mask, False, False,
                      act=fns[act], rec_act=fns["hard_sigmoid"])
  out, _, _ = tfbs.ops.lstm_sequence(x, *states, rec, mask=mask,
                                     activation=act,
                                     recurrent_activation="hard_sigmoid")
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-6)


def test_float64_and_callable_activation():
  u, x, states, _, _ = _case("simple", 8, (4, 4), seed=4)
  rec = tfbs.BlockSparseMatrix.from_dense(u.astype(np.float64), 4)
  want, _ = numpy_rnn("simple", x, states, u, None, None, False, False)
  out, _ = tfbs.ops.simple_rnn_sequence(x.astype(np.float64),
                                        states[0].astype(np.float64), rec)
  np.testing.assert_allclose(out, want, rtol=1e-10)
  # A callable runs the TF loop.
  rec32 = tfbs.BlockSparseMatrix.from_dense(u, 4)
  out, _ = tfbs.ops.simple_rnn_sequence(x, states[0], rec32,
                                        activation=lambda v: tf.tanh(v))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def _dense_rnn(kind, x, states, u, rbias, mask, go_backwards=False,
               zero_out=False):
  """A plain dense TF recurrence (tf_keras semantics, independent of BSR):
  returns the outputs, in processing order, and the final states."""
  xs, ms = tf.unstack(x, axis=1), tf.unstack(tf.constant(mask), axis=1)
  if go_backwards:
    xs, ms = xs[::-1], ms[::-1]
  h_units = u.shape[0]
  st = list(states)
  prev = tf.zeros_like(st[0])
  outs = []
  for xt, mt in zip(xs, ms):
    h = st[0]
    if kind == "lstm":
      i, f, g, o = tf.split(xt + h @ u, 4, axis=1)
      c = tf.sigmoid(f) * st[1] + tf.sigmoid(i) * tf.tanh(g)
      new = [tf.sigmoid(o) * tf.tanh(c), c]
    elif kind == "simple":
      new = [tf.tanh(xt + h @ u)]
    else:
      xz, xr, xh = tf.split(xt, 3, axis=1)
      inner = h @ u + (0 if rbias is None else rbias)
      rz, rr, rh = tf.split(inner, 3, axis=1)
      z, r = tf.sigmoid(xz + rz), tf.sigmoid(xr + rr)
      hh = (tf.tanh(xh + r * rh) if kind == "gru"
            else tf.tanh(xh + (r * h) @ u[:, 2 * h_units:]))
      new = [z * h + (1 - z) * hh]
    keep = mt[:, None]
    out = tf.where(keep, new[0], tf.zeros_like(prev) if zero_out else prev)
    st = [tf.where(keep, n, s) for n, s in zip(new, st)]
    prev = out
    outs.append(out)
  return tf.stack(outs, axis=1), st


def _weighted_sum(out, states, weights):
  return tf.reduce_sum(out * weights[0]) + sum(
      tf.reduce_sum(s * w) for s, w in zip(states, weights[1:]))


def _dense_loop_loss(kind, x, states, u, rbias, mask, weights):
  """The loss through a plain dense TF implementation (independent of BSR)."""
  return _weighted_sum(*_dense_rnn(kind, x, states, u, rbias, mask), weights)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", sorted(GATES))
def test_gradients_match_dense_autodiff(path, kind):
  u, x, states, mask, rbias = _case(kind, 12, (4, 4), seed=5, time=4)
  rng = np.random.default_rng(6)
  weights = [rng.standard_normal([3, 4, 12]).astype(np.float32)] + [
      rng.standard_normal([3, 12]).astype(np.float32) for _ in states]
  rec = tfbs.BlockSparseMatrix.from_dense(u, 4)
  x_t = tf.constant(x)
  s_t = [tf.constant(s) for s in states]
  values = tf.Variable(rec.values)
  rb = None if rbias is None else tf.constant(rbias)
  with path_scope(path), tf.GradientTape() as tape:
    tape.watch([x_t, *s_t] + ([rb] if rb is not None else []))
    out, got_states = _run(kind, x_t, s_t, rec.with_values(values), rb,
                           mask=mask)
    loss = tf.reduce_sum(out * weights[0]) + sum(
        tf.reduce_sum(s * w) for s, w in zip(got_states, weights[1:]))
  sources = [x_t, *s_t, values] + ([rb] if rb is not None else [])
  got = tape.gradient(loss, sources)

  u_t = tf.constant(u)
  with tf.GradientTape() as tape:
    tape.watch([x_t, *s_t, u_t] + ([rb] if rb is not None else []))
    ref = _dense_loop_loss(kind, x_t, s_t, u_t, rb, mask, weights)
  want = tape.gradient(ref, [x_t, *s_t, u_t] + ([rb] if rb is not None else []))
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  for g, w in zip(got[:len(s_t) + 1], want[:len(s_t) + 1]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # The values gradient is the dense gradient restricted to the kept blocks.
  want_values = tfbs.BlockSparseMatrix.from_mask(
      want[len(s_t) + 1], _block_mask(u, 4), 4).values
  np.testing.assert_allclose(got[len(s_t) + 1], want_values, rtol=1e-4,
                             atol=1e-5)
  if rb is not None:
    np.testing.assert_allclose(got[-1], want[-1], rtol=1e-4, atol=1e-5)


# The gradient recomputes the loop with BSR products (the kernels or the
# pure-TF ones) or, for mostly dense matrices, with dense GEMMs, and takes
# the values gradient in one product over the whole sequence (the same two
# ways). The instruction sets are tested with the products themselves, so
# the compiled path runs only with the one the dispatch picks ("custom").
GRAD_VARIANTS = [("fallback", "bsr")]
if any(path.startswith("custom") for path in PATHS):
  GRAD_VARIANTS += [("custom", "bsr"), ("custom", "dense")]


@pytest.mark.parametrize("path,route", GRAD_VARIANTS)
@pytest.mark.parametrize("kind", sorted(GATES))
@pytest.mark.parametrize("go_backwards,zero_out,units,block", [
    (True, False, 12, (4, 4)), (False, True, 10, (8, 4))])  # 10: edge blocks
def test_all_gradients_match_dense_loop(monkeypatch, path, route, kind,
                                        go_backwards, zero_out, units, block):
  """d values, d x_proj, d h0 (, d c0, d recurrent_bias) in a tf.function
  against the dense loop over `to_dense()`, masked, in both directions."""
  min_density = 0.0 if route == "dense" else 2.0
  monkeypatch.setattr(bsr_rnn, "_DENSE_VALUES_GRAD_MIN_DENSITY", min_density)
  monkeypatch.setattr(bsr_rnn, "_DENSE_STEPS_MIN_DENSITY", min_density)
  u, x, states, mask, rbias = _case(kind, units, block, seed=8, time=5)
  rec = tfbs.BlockSparseMatrix.from_dense(u, block)
  rng = np.random.default_rng(9)
  weights = [rng.standard_normal([3, 5, units]).astype(np.float32)] + [
      rng.standard_normal([3, units]).astype(np.float32) for _ in states]
  sources = [tf.constant(x), *map(tf.constant, states), rec.values]
  if rbias is not None:
    sources.append(tf.constant(rbias))
  options = dict(mask=mask, go_backwards=go_backwards,
                 zero_output_for_mask=zero_out)

  def split(args):
    n = len(states)
    rb = args[n + 2] if rbias is not None else None
    return args[0], list(args[1:n + 1]), args[n + 1], rb

  def ours(*args):
    x, st, values, rb = split(args)
    out, got = _run(kind, x, st, rec.with_values(values), rb, **options)
    return _weighted_sum(out, got, weights)

  def dense(*args):
    x, st, values, rb = split(args)
    u = rec.with_values(values).to_dense()
    return _weighted_sum(*_dense_rnn(kind, x, st, u, rb, mask, go_backwards,
                                     zero_out), weights)

  def gradients(fn):
    with tf.GradientTape() as tape:
      tape.watch(sources)
      loss = fn(*sources)
    return loss, tape.gradient(loss, sources)

  with path_scope(path):
    loss, got = tf.function(lambda: gradients(ours))()
  want_loss, want = gradients(dense)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  names = ["x_proj", "h0", "c0"][:len(states) + 1] + ["values", "bias"]
  for name, g, w in zip(names, got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kind,route", [("lstm", "bsr"),
                                        ("gru_before", "dense")])
def test_second_derivatives_match_dense_loop(monkeypatch, kind, route):
  """Nothing in the gradient is stopped: a gradient penalty's gradient for
  the block values is that of the dense loop."""
  min_density = 0.0 if route == "dense" else 2.0
  monkeypatch.setattr(bsr_rnn, "_DENSE_VALUES_GRAD_MIN_DENSITY", min_density)
  monkeypatch.setattr(bsr_rnn, "_DENSE_STEPS_MIN_DENSITY", min_density)
  u, x, states, mask, _ = _case(kind, 8, (4, 4), seed=11, time=3)
  rec = tfbs.BlockSparseMatrix.from_dense(u, 4)
  x = tf.constant(x)

  def penalty_grad(run):
    with tf.GradientTape() as outer:
      outer.watch(rec.values)
      with tf.GradientTape() as inner:
        inner.watch(x)
        out, _ = run(rec.with_values(rec.values))
        loss = tf.reduce_sum(out ** 2)
      penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
    return outer.gradient(penalty, rec.values)

  got = tf.function(lambda: penalty_grad(
      lambda m: _run(kind, x, states, m, mask=mask)))()
  want = penalty_grad(lambda m: _dense_rnn(kind, x, states, m.to_dense(),
                                           None, mask))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_values_gradient_of_an_empty_matrix():
  u, x, states, mask, _ = _case("lstm", 8, (4, 4), seed=10, time=3)
  rec = tfbs.BlockSparseMatrix.from_dense(np.zeros_like(u), 4)
  for path in PATHS:
    with path_scope(path), tf.GradientTape() as tape:
      tape.watch(rec.values)
      out, _, _ = tfbs.ops.lstm_sequence(x, *states, rec, mask=mask)
      loss = tf.reduce_sum(out)
    assert tape.gradient(loss, rec.values).shape == (0, 4, 4)


def _block_mask(u, b):
  k, n = u.shape
  return np.abs(u).reshape(k // b, b, n // b, b).sum(axis=(1, 3)) > 0


def test_gradient_in_tf_function_matches_eager():
  u, x, states, mask, _ = _case("lstm", 8, (4, 4), seed=7, time=3)
  values = tf.Variable(tfbs.BlockSparseMatrix.from_dense(u, 4).values)
  rec = tfbs.BlockSparseMatrix.from_dense(u, 4)

  def grad():
    with tf.GradientTape() as tape:
      out, _, _ = tfbs.ops.lstm_sequence(x, *states, rec.with_values(values),
                                         mask=mask)
      loss = tf.reduce_sum(out ** 2)
    return tape.gradient(loss, values)

  np.testing.assert_allclose(tf.function(grad)(), grad(), rtol=1e-5, atol=1e-6)


# --- bad input ---------------------------------------------------------------


def test_python_checks_name_the_problem():
  u, x, states, mask, _ = _case("lstm", 8, (4, 4))
  rec = tfbs.BlockSparseMatrix.from_dense(u, 4)
  err = tf.errors.InvalidArgumentError
  with pytest.raises(err, match="x_proj has 31 features"):
    tfbs.ops.lstm_sequence(x[..., :31], *states, rec)
  with pytest.raises(err, match="initial state 1 must have shape"):
    tfbs.ops.lstm_sequence(x, states[0], states[1][:, :5], rec)
  with pytest.raises(err, match="mask must have shape"):
    tfbs.ops.lstm_sequence(x, *states, rec, mask=mask[:, :2])
  with pytest.raises(err, match="rank 3"):
    tfbs.ops.lstm_sequence(x[0], *states, rec)
  with pytest.raises(err, match="ragged"):
    tfbs.ops.lstm_sequence(tf.RaggedTensor.from_row_lengths(
        x.reshape(-1, 32), [6, 6, 6]), *states, rec)
  with pytest.raises(err, match=r"\[units, 3 \* units\]"):
    tfbs.ops.gru_sequence(x[..., :24], states[0], rec)
  with pytest.raises(ValueError, match="unknown activation"):
    tfbs.ops.lstm_sequence(x, *states, rec, activation="swishy")


def test_kernel_rejects_bad_inputs():
  """The C++ op validates what the Python wrapper cannot see statically."""
  lib = _loader.library()
  u, x, states, mask, _ = _case("lstm", 8, (4, 4))
  rec = tfbs.BlockSparseMatrix.from_dense(u, 4)
  vals, cols, rows = rec.values, rec.col_indices, rec.row_ptr
  shape = tf.constant([8, 32], tf.int64)
  h, c = states
  empty = tf.zeros([0], tf.bool)
  cases = [
      ((x, h[:2], c, empty, vals, cols, rows, shape), "h0 has batch size 2"),
      ((x, h, c[:, :4], empty, vals, cols, rows, shape), "c0 must have the shape"),
      ((x, h, c, mask[:, :3], vals, cols, rows, shape), "mask must have shape"),
      ((x, h, c, empty, vals, cols + 100, rows, shape), "out of range"),
      ((x, h, c, empty, vals, cols, rows[:-1], shape), "row_ptr must have"),
      ((x, h, c, empty, vals, cols, rows,
        tf.constant([8, 36], tf.int64)), "recurrent matrix must be"),
      ((x[..., :28], h, c, empty, vals, cols, rows, shape), "28 columns"),
  ]
  for args, message in cases:
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      lib.tfbs_bsr_lstm_sequence(*args)
  with pytest.raises(tf.errors.InvalidArgumentError, match="no fused kernel"):
    lib.tfbs_bsr_lstm_sequence(x, h, c, empty, vals, cols, rows, shape,
                               activation="softplus")
  with pytest.raises(tf.errors.InvalidArgumentError, match="recurrent_bias"):
    lib.tfbs_bsr_gru_sequence(x[..., :24], h, empty, tf.zeros([5]),
                              *tfbs.BlockSparseMatrix.from_dense(
                                  u[:, :24], 4).numpy_components(),
                              tf.constant([8, 24], tf.int64))
