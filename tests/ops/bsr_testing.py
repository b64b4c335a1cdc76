"""Helpers shared by the BSR tests: random block-sparse matrices and the
execution paths: the compiled kernels on every CPU instruction set this
machine runs ("custom:avx512", ...), and the pure-TF fallback."""

import contextlib
import re

import numpy as np
import tensorflow as tf

import tf_blocksparse as tfbs


def _supported_isas():
  info = tfbs.ops.kernel_info()
  return info.get("supported", []) if info["custom_ops"] else []


# "custom" alone is the ISA the dispatch picks; the named ones are forced.
PATHS = tuple(f"custom:{isa}" for isa in _supported_isas()) + ("fallback",)


@contextlib.contextmanager
def path_scope(path):
  """Runs the block with the compiled ops (custom[:isa]) or the pure-TF ones."""
  kind, _, isa = path.partition(":")
  if kind == "custom" and isa:
    tfbs.ops.set_kernel_isa(isa)
  try:
    with tfbs.ops.use_custom_ops(kind == "custom"):
      yield
  finally:
    if kind == "custom" and isa:
      tfbs.ops.set_kernel_isa("auto")


def random_block_sparse(rng, k, n, block, density=0.4, dtype=np.float32):
  """A dense [k, n] array whose non-zeros fill random whole blocks, and its
  block mask. Edge blocks are cut at k and n (ragged shapes)."""
  bh, bw = block
  nbr, nbc = -(-k // bh), -(-n // bw)
  mask = rng.random([nbr, nbc]) < density
  expand = np.kron(mask, np.ones([bh, bw]))[:k, :n]
  dense = rng.standard_normal([k, n]) * expand
  return dense.astype(dtype), mask


def check_product_and_transposed(path, w, dense, x, dy, tol, what=""):
  """x @ W and its input gradient dy @ W^T on `path`, against float64 numpy."""
  with path_scope(path):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch(xt)
      y = tfbs.ops.bsr_matmul(xt, w)
    dx = tape.gradient(y, xt, output_gradients=tf.constant(dy))
  np.testing.assert_allclose(y.numpy(), x.astype(np.float64) @ dense,
                             rtol=tol, atol=tol, err_msg=what)
  np.testing.assert_allclose(dx.numpy(), dy.astype(np.float64) @ dense.T,
                             rtol=tol, atol=tol, err_msg=what)


def numpy_bsr(dense, mask, block):
  """BSR components built with plain loops, as an independent reference."""
  bh, bw = block
  k, n = dense.shape
  values, cols, row_ptr = [], [], [0]
  for i in range(mask.shape[0]):
    for j in range(mask.shape[1]):
      if mask[i, j]:
        blk = np.zeros([bh, bw], dense.dtype)
        part = dense[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]
        blk[:part.shape[0], :part.shape[1]] = part
        values.append(blk)
        cols.append(j)
    row_ptr.append(len(cols))
  values = np.array(values, dense.dtype).reshape([-1, bh, bw])
  return values, np.array(cols, np.int32), np.array(row_ptr, np.int32)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_rnn(kind, x_proj, states, u, rbias, mask, go_backwards, zero_out,
              act=np.tanh, rec_act=sigmoid):
  """Keras semantics, written out in float64 numpy."""
  x_proj = x_proj.astype(np.float64)
  states = [s.astype(np.float64) for s in states]
  b, t, _ = x_proj.shape
  h_units = u.shape[0]
  order = range(t - 1, -1, -1) if go_backwards else range(t)
  prev = np.zeros([b, h_units])
  outs = []
  for step in order:
    x = x_proj[:, step]
    h = states[0]
    if kind == "simple":
      new = [act(x + h @ u)]
    elif kind == "lstm":
      z = x + h @ u
      i, f, g, o = np.split(z, 4, axis=1)
      c = rec_act(f) * states[1] + rec_act(i) * act(g)
      new = [rec_act(o) * act(c), c]
    else:
      xz, xr, xh = np.split(x, 3, axis=1)
      inner = h @ u + (0 if rbias is None else rbias)
      rz, rr, rh = np.split(inner, 3, axis=1)
      z, r = rec_act(xz + rz), rec_act(xr + rr)
      if kind == "gru":
        hh = act(xh + r * rh)
      else:
        hh = act(xh + (r * h) @ u[:, 2 * h_units:])
      new = [z * h + (1 - z) * hh]
    out = new[0]
    if mask is not None:
      keep = mask[:, step][:, None]
      new = [np.where(keep, n, s) for n, s in zip(new, states)]
      out = np.where(keep, out, 0 if zero_out else prev)
    states, prev = new, out
    outs.append(out)
  if not outs:  # no steps: empty outputs, the initial states
    return np.zeros([b, 0, h_units]), states
  return np.stack(outs, axis=1), states


def core_message(error):
  """The text of an InvalidArgumentError without TensorFlow's wrapping: the
  kernel's message, or the text inside a fallback assertion."""
  text = error.message
  # (greedy to the end of the line: the messages hold brackets themselves)
  found = re.search(r"Summarized data: b'(.*)'", text) or re.search(
      r"assertion failed: \[(.*)\]", text)
  if found:
    return found.group(1)
  raised = re.findall(r"InvalidArgumentError: (.*)", text)
  if raised:  # raised while tracing: the message after the traceback
    return raised[-1].strip()
  text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
  text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
  text = re.sub(r"\s*\[\[\{\{node [^\n]*", "", text)
  lines = [l for l in text.split("\n") if l.strip() and not l.startswith(
      ("Graph execution error", "Detected at node", "  File", "    "))]
  return lines[-1].strip() if lines else text.strip()
