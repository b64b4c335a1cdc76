"""Benchmark: x @ W for a block-sparse W, ours against TensorFlow's paths.

Side by side in one run, for each case:
- in-graph kernel time (the headline): dense `tf.matmul`, TF's CSR
  `SparseMatrixMatMul`, `tf.sparse.sparse_dense_matmul`, our compiled op and
  our pure-TF fallback, each run in an in-graph loop
  (`tf_blocksparse.benchmarking.in_graph_timer`) so that Python dispatch is
  not what is measured; the loop's own cost (~50 us an iteration on the
  2-core machine) is measured in the same run and subtracted;
- effective GFLOP/s: ours 2*M*nnz/t (nnz = stored blocks * block area),
  dense 2*M*K*N/t, and their ratio;
- per-call time as a user sees it: eager `bsr_matmul(x, m)` and a
  `tf.function` of one call, ours and dense, and what a call costs beyond
  its kernel (per call - in-graph kernel), ours minus dense (target
  <= 30 us);
- PyTorch's CPU block-sparse product (`to_sparse_bsr`) and dense matmul,
  when `import torch` works (not a dependency; skipped with a note), with
  as many threads as TF uses, timed from a Python loop in rounds of their
  own after TF's.
At the target case (2048^2, 90 %, 16x16) it also times the backward ops
against their dense counterparts: dx = dy @ W^T (`TfbsBsrMatmulTransposed`
vs `tf.matmul(dy, W, transpose_b=True)`), dvalues
(`TfbsBsrMatmulValuesGrad` vs the dense weight gradient
`tf.matmul(x, dy, transpose_a=True)`) and a whole training step of the
product (forward, dx and the weight gradient through `tf.GradientTape`).

All timers of a case are prepared first, then run in turns for `--repeats`
rounds (dense, ours, dense, ours, ..., the order rotated each round:
`benchmarking.interleaved_medians`); the medians are reported, so drift in
the machine's load lands on all of them alike. Every method's result is
checked against numpy before it is timed. Prints tables, writes
`bsr_matmul_cpu_<mode>.json` (with the CPU, its flags, TF and the kernels'
ISA in "meta", and every sample) and a PNG to `--out`.

  python benchmarks/bsr_matmul.py            # sweeps around 2048, 90 %, 16x16 (~7 min on 2 cores)
  python benchmarks/bsr_matmul.py --full     # the whole grid of the issue (~40 min)
  python benchmarks/bsr_matmul.py --quick    # one matrix, a smoke run (~1 min)
"""

import argparse
import json
import os
import warnings

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops

import tf_blocksparse as tfbs
from tf_blocksparse import benchmarking
from tf_blocksparse.ops import _loader

SIZES = (1024, 2048, 4096)
ROWS = (1, 16, 64, 256)
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCKS = (4, 8, 16, 32)
METHODS = ("dense", "tf_csr", "tf_sparse_tensor", "ours", "ours_fallback")
TF_SPARSE = ("tf_csr", "tf_sparse_tensor")
PER_CALL = ("ours_eager", "dense_eager", "ours_tf_function", "dense_tf_function")
TORCH = ("torch_bsr", "torch_dense")
TARGET = (2048, 0.9, 16)
PER_CALL_TARGET_US = 30.0
NET_FLOOR_MS = 1e-4
# A net time under this fraction of the loop's own cost is within its noise.
NOISE_FRACTION = 0.1


def block_sparse_weight(rng, size, block, sparsity):
  nb = size // block
  mask = rng.permutation(nb * nb) >= round(sparsity * nb * nb)
  mask = mask.reshape(nb, nb)
  w = rng.standard_normal([size, size]).astype(np.float32)
  return w * np.kron(mask, np.ones([block, block], np.float32))


def make_ops(w, matrix):
  """One callable per method, each mapping x [M, K] to x @ W."""
  dense = tf.constant(w)
  # TF's sparse ops multiply sparse @ dense: use (W^T x^T)^T.
  w_t_sparse = tf.sparse.from_dense(tf.constant(w.T))
  csr_w_t = sparse_csr_matrix_ops.CSRSparseMatrix(w_t_sparse)

  def csr(x):
    return sparse_csr_matrix_ops.sparse_matrix_mat_mul(
        csr_w_t._matrix, x, transpose_b=True, transpose_output=True)

  def sparse_tensor(x):
    return tf.transpose(tf.sparse.sparse_dense_matmul(w_t_sparse, x, adjoint_b=True))

  return {
      "dense": lambda x: tf.matmul(x, dense),
      "tf_csr": csr,
      "tf_sparse_tensor": sparse_tensor,
      "ours": lambda x: tfbs.ops.bsr_matmul(x, matrix),
      "ours_fallback": lambda x: tfbs.ops.bsr_matmul(x, matrix),
  }


def check(got, expected, what):
  # A benchmark of a wrong answer is worthless: every method is checked.
  got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
  np.testing.assert_allclose(got, expected, rtol=1e-3,
                             atol=1e-3 * max(np.abs(expected).max(), 1e-30),
                             err_msg=what)


def in_graph_timers(ops, x, expected, budget_s):
  timers = {"loop_overhead": benchmarking.in_graph_timer(tf.identity, x, budget_s)}
  for name in METHODS:
    custom = name != "ours_fallback"
    with tfbs.ops.use_custom_ops(custom):
      check(tf.function(ops[name])(x), expected, name)
    timers[name] = benchmarking.in_graph_timer(ops[name], x, budget_s, custom_ops=custom)
  return timers


def per_call_timers(ops, x, expected, budget_s):
  """Python-level calls: eager, and a tf.function of one call, ours and dense."""
  timers = {}
  for name in ("ours", "dense"):
    fn = ops[name]
    check(fn(x), expected, name + " eager")
    timers[name + "_eager"] = benchmarking.per_call_timer(fn, x, budget_s=budget_s)
    graph = tf.function(fn)
    check(graph(x), expected, name + " tf.function")
    timers[name + "_tf_function"] = benchmarking.per_call_timer(graph, x, budget_s=budget_s)
  return timers


def import_torch():
  """torch, or None with a note why (it is an optional contender)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"torch not importable ({e}): its contender skipped"
  torch.set_num_threads(os.cpu_count() or 1)  # as many threads as TF uses
  return torch, None


def torch_timers(torch, w, block, x, expected, budget_s):
  """PyTorch CPU block-sparse and dense products, timed from a Python loop.

  Its CPU BSR kernels do sparse @ dense only (x @ W_bsr raises "not
  implemented for Strided + Strided @ SparseBsr"), so this computes
  (W^T_bsr @ x^T)^T, as TF's sparse ops are used above.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "BSR support is in beta state"
    w_t_bsr = torch.from_numpy(np.ascontiguousarray(w.T)).to_sparse_bsr((block, block))
  w_dense = torch.from_numpy(w)
  xt = torch.from_numpy(x)
  fns = {"torch_bsr": lambda: (w_t_bsr @ xt.t()).t(),
         "torch_dense": lambda: xt @ w_dense}
  timers = {}
  for name, fn in fns.items():
    check(fn(), expected, name)
    timers[name] = benchmarking.per_call_timer(fn, budget_s=budget_s)
  return timers


def run_case(rng, size, rows, sparsity, block, args, torch):
  w = block_sparse_weight(rng, size, block, sparsity)
  matrix = tfbs.BlockSparseMatrix.from_dense(w, block)
  ops = make_ops(w, matrix)
  x_np = rng.standard_normal([rows, size]).astype(np.float32)
  x = tf.constant(x_np)
  expected = x_np @ w
  timers = in_graph_timers(ops, x, expected, args.budget)
  timers.update(per_call_timers(ops, x, expected, args.budget * 2 / 3))
  medians, samples = benchmarking.interleaved_medians(timers, args.repeats)
  if torch is not None:
    # Its own rounds: torch's OpenMP threads spin-wait for a while after each
    # call, which would slow whichever TF timer came next.
    timers = torch_timers(torch, w, block, x_np, expected, args.budget * 2 / 3)
    more = benchmarking.interleaved_medians(timers, args.repeats)
    medians.update(more[0])
    samples.update(more[1])
  row = {"k": size, "n": size, "m": rows, "sparsity": sparsity, "block": block,
         "nnz_blocks": int(matrix.num_blocks), "repeats": args.repeats}
  row["loop_overhead_ms"] = medians["loop_overhead"]
  for name in METHODS:
    row[name + "_raw_ms"] = medians[name]
    row[name + "_ms"] = paired_net(samples, name, "loop_overhead")
  row["within_noise"] = within_noise(row, METHODS, row["loop_overhead_ms"])
  for name in PER_CALL + TORCH:
    if name in medians:
      row[name + "_ms"] = medians[name]
  row.update(derived(row, samples))
  row["samples_ms"] = samples
  return row


def paired_net(samples, name, overhead):
  """Median over rounds of (time - loop cost of the same round), in ms.

  Pairing within a round cancels drift between rounds; the floor keeps
  ratios finite where a kernel is lost in the loop's own cost.
  """
  net = np.subtract(samples[name], samples[overhead])
  return max(float(np.median(net)), NET_FLOOR_MS)


def within_noise(row, names, overhead_ms):
  """Methods whose net time is under NOISE_FRACTION of the loop's own cost."""
  return [n for n in names if row[n + "_ms"] < NOISE_FRACTION * overhead_ms]


def per_call_extra_us(samples, name, mode):
  """Median over rounds of (per-call time - in-graph net kernel time), us."""
  kernel = np.subtract(samples[name], samples["loop_overhead"])
  return np.subtract(samples[f"{name}_{mode}"], kernel) * 1e3


def derived(row, samples):
  """Ratios, GFLOP/s and per-call costs from a row's median times."""
  out = {}
  best_tf_sparse = min(row[m + "_ms"] for m in TF_SPARSE)
  out["ours_vs_dense"] = row["dense_ms"] / row["ours_ms"]
  out["ours_vs_best_tf_sparse"] = best_tf_sparse / row["ours_ms"]
  out["best_tf_sparse_vs_dense"] = row["dense_ms"] / best_tf_sparse
  nnz = row["nnz_blocks"] * row["block"] ** 2
  out["ours_gflops"] = 2 * row["m"] * nnz / row["ours_ms"] / 1e6
  out["dense_gflops"] = 2 * row["m"] * row["k"] * row["n"] / row["dense_ms"] / 1e6
  out["gflops_ratio"] = out["ours_gflops"] / out["dense_gflops"]
  # What a Python-level call costs on top of its kernel, and how much more
  # ours costs than dense tf.matmul's (the target: <= 30 us).
  # Per round, so that the four times subtracted are from the same seconds.
  for mode in ("eager", "tf_function"):
    ours = per_call_extra_us(samples, "ours", mode)
    dense = per_call_extra_us(samples, "dense", mode)
    out[f"ours_{mode}_extra_us"] = float(np.median(ours))
    out[f"dense_{mode}_extra_us"] = float(np.median(dense))
    out[f"{mode}_extra_ours_minus_dense_us"] = float(np.median(ours - dense))
  if "torch_bsr_ms" in row:
    out["torch_bsr_vs_tf_dense"] = row["dense_ms"] / row["torch_bsr_ms"]
    out["torch_bsr_vs_torch_dense"] = row["torch_dense_ms"] / row["torch_bsr_ms"]
    out["ours_vs_torch_bsr"] = row["torch_bsr_ms"] / row["ours_ms"]
  return out


# --- Backward ------------------------------------------------------------


def backward_ops(w, matrix, x, dy):
  """name -> (fn of the timed input, which input, numpy expectation)."""
  lib = _loader._load()  # pylint: disable=protected-access
  bsr = (matrix.values, matrix.col_indices, matrix.row_ptr,
         tf.constant(matrix.shape, tf.int64))
  dense = tf.constant(w)
  x_np, dy_np = x.numpy(), dy.numpy()
  dw_np = x_np.T @ dy_np
  dvalues_np = stored_blocks(dw_np, matrix)
  ours = lambda v, p: tfbs.ops.bsr_matmul(v, matrix.with_values(p))  # noqa: E731
  return {
      "dx_ours": (lambda g: lib.tfbs_bsr_matmul_transposed(g, *bsr), "dy", dy_np @ w.T),
      "dx_dense": (lambda g: tf.matmul(g, dense, transpose_b=True), "dy", dy_np @ w.T),
      "dvalues_ours": (lambda v: lib.tfbs_bsr_matmul_values_grad(v, dy, *bsr), "x",
                       dvalues_np),
      "dw_dense": (lambda v: tf.matmul(v, dy, transpose_a=True), "x", dw_np),
      "step_ours": (train_step(ours, matrix.values), "x_dy",
                    (x_np @ w, dy_np @ w.T, dvalues_np)),
      "step_dense": (train_step(tf.matmul, dense), "x_dy", (x_np @ w, dy_np @ w.T, dw_np)),
  }


def stored_blocks(dense, matrix):
  """The blocks of a dense [K, N] array where `matrix` stores blocks."""
  b = matrix.block_size[0]
  k, n = dense.shape
  blocks = dense.reshape(k // b, b, n // b, b).transpose(0, 2, 1, 3)
  rows = np.repeat(np.arange(k // b), np.diff(matrix.row_ptr.numpy()))
  return blocks[rows, matrix.col_indices.numpy()]


def train_step(product, params):
  """[x; dy] -> (y, dx, dparams) of y = product(x, params), via GradientTape.

  What one training step of the layer costs: the forward product and both
  gradients. x and dy come stacked in one input (square W) so that both
  change in the timing loop: with a constant dy, dx = dy @ W^T would be
  loop invariant.
  """
  def step(x_dy):
    x, dy = tf.split(x_dy, 2)
    with tf.GradientTape() as tape:
      tape.watch([x, params])
      y = product(x, params)
    dx, dp = tape.gradient(y, [x, params], output_gradients=dy)
    return y, dx, dp
  return step


def first_elements_summed(fn):
  """fn's outputs joined into one [1] tensor that depends on each of them.

  `in_graph_timer`'s loop keeps only element 0 of what it is given; a stack
  of the outputs would let the graph prune all but the first.
  """
  return lambda x: tf.reshape(tf.add_n([tf.reshape(t, [-1])[0] for t in fn(x)]), [1])


def backward_timers(ops, inputs, budget_s):
  timers = {"loop_overhead_" + k: benchmarking.in_graph_timer(tf.identity, v, budget_s)
            for k, v in inputs.items()}
  for name, (fn, arg, expected) in ops.items():
    got = tf.function(fn)(inputs[arg])
    if name.startswith("step"):
      for part, g, e in zip(("y", "dx", "dparams"), got, expected):
        check(g, e, f"{name} {part}")
      fn = first_elements_summed(fn)
    else:
      check(got, expected, name)
    timers[name] = benchmarking.in_graph_timer(fn, inputs[arg], budget_s)
  return timers


def run_backward(rng, size, rows, sparsity, block, args):
  w = block_sparse_weight(rng, size, block, sparsity)
  matrix = tfbs.BlockSparseMatrix.from_dense(w, block)
  x = tf.constant(rng.standard_normal([rows, size]).astype(np.float32))
  dy = tf.constant(rng.standard_normal([rows, size]).astype(np.float32))
  inputs = {"x": x, "dy": dy, "x_dy": tf.concat([x, dy], 0)}
  ops = backward_ops(w, matrix, x, dy)
  medians, samples = benchmarking.interleaved_medians(
      backward_timers(ops, inputs, args.budget), args.repeats)
  row = {"k": size, "n": size, "m": rows, "sparsity": sparsity, "block": block,
         "nnz_blocks": int(matrix.num_blocks), "repeats": args.repeats}
  for name, (_, arg, _) in ops.items():
    row[name + "_raw_ms"] = medians[name]
    row[name + "_ms"] = paired_net(samples, name, "loop_overhead_" + arg)
  row.update(backward_derived(row))
  row["samples_ms"] = samples
  return row


def backward_derived(row):
  out = {}
  for op, dense in (("dx", "dx_dense"), ("dvalues", "dw_dense"), ("step", "step_dense")):
    out[op + "_ours_vs_dense"] = row[dense + "_ms"] / row[op + "_ours_ms"]
  flops_ours = 2 * row["m"] * row["nnz_blocks"] * row["block"] ** 2
  flops_dense = 2 * row["m"] * row["k"] * row["n"]
  for op in ("dx", "dvalues"):
    out[op + "_ours_gflops"] = flops_ours / row[op + "_ours_ms"] / 1e6
  for dense in ("dx_dense", "dw_dense"):
    out[dense + "_gflops"] = flops_dense / row[dense + "_ms"] / 1e6
  return out


# --- Cases, tables, plot -------------------------------------------------


def cases(mode):
  if mode == "full":
    return [(s, m, p, b) for s in SIZES for b in BLOCKS for p in SPARSITIES for m in ROWS]
  if mode == "quick":
    return [(1024, m, 0.9, 16) for m in (1, 64)]
  # Default: the target case and one sweep along each axis from it
  # (so 2048^2 at block 4 and 32, and at 50 %, at every M).
  grid = []
  for s in SIZES:
    grid += [(s, m, 0.9, 16) for m in ROWS]
  for p in SPARSITIES:
    if p != 0.9:
      grid += [(2048, m, p, 16) for m in ROWS]
  for b in BLOCKS:
    if b != 16:
      grid += [(2048, m, 0.9, b) for m in ROWS]
  return grid


def backward_cases(mode, rows):
  size = 1024 if mode == "quick" else TARGET[0]
  return [(size, m, TARGET[1], TARGET[2]) for m in rows]


def _case(r):
  return f"{r['k']:>5} {r['m']:>4} {r['sparsity']:>5.2f} {r['block']:>3}"


def print_kernel_table(rows):
  header = (f"{'K=N':>5} {'M':>4} {'spars':>5} {'blk':>3} | {'dense ':>9} {'tf_csr ':>9} "
            f"{'tf_sp ':>9} {'ours ':>9} {'fallbk ':>9} | {'vs dense':>8} {'vs TFsp':>8} | "
            f"{'GF/s ours':>9} {'dense':>7} {'ratio':>6}")
  print(header)
  print("-" * len(header))
  for r in rows:
    t = {m: f"{r[m + '_ms']:.3f}" + ("*" if m in r["within_noise"] else " ") for m in METHODS}
    print(f"{_case(r)} | "
          f"{t['dense']:>9} {t['tf_csr']:>9} {t['tf_sparse_tensor']:>9} "
          f"{t['ours']:>9} {t['ours_fallback']:>9} | "
          f"{r['ours_vs_dense']:>7.2f}x {r['ours_vs_best_tf_sparse']:>7.1f}x | "
          f"{r['ours_gflops']:>9.1f} {r['dense_gflops']:>7.1f} {r['gflops_ratio']:>6.2f}")
  print("in-graph kernel: net ms per call (loop overhead subtracted), median of interleaved "
        "repeats; 'vs dense' = dense / ours,\n'vs TFsp' = best TF sparse / ours; GF/s: ours "
        "2*M*nnz/t, dense 2*M*K*N/t; ratio = ours / dense GF/s;\n"
        f"* = under {NOISE_FRACTION:.0%} of the loop's own cost (within its noise): ratios "
        "with it are unreliable")


def print_per_call_table(rows):
  header = (f"{'K=N':>5} {'M':>4} {'spars':>5} {'blk':>3} | {'eager ours':>10} {'dense':>7} | "
            f"{'tf.fn ours':>10} {'dense':>7} | {'extra-dense eager':>17} {'tf.fn':>7}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{_case(r)} | {r['ours_eager_ms'] * 1e3:>10.1f} {r['dense_eager_ms'] * 1e3:>7.1f} | "
          f"{r['ours_tf_function_ms'] * 1e3:>10.1f} {r['dense_tf_function_ms'] * 1e3:>7.1f} | "
          f"{r['eager_extra_ours_minus_dense_us']:>17.1f} "
          f"{r['tf_function_extra_ours_minus_dense_us']:>7.1f}")
  print("per call from Python, us (median); 'extra-dense' = (ours per call - ours kernel) - "
        f"(dense per call - dense kernel), target <= {PER_CALL_TARGET_US:.0f} us")


def print_torch_table(rows):
  header = (f"{'K=N':>5} {'M':>4} {'spars':>5} {'blk':>3} | {'torch bsr':>9} {'dense':>8} | "
            f"{'vs TF dense':>11} {'vs torch dense':>14} | {'ours vs it':>10}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{_case(r)} | {r['torch_bsr_ms']:>9.3f} {r['torch_dense_ms']:>8.3f} | "
          f"{r['torch_bsr_vs_tf_dense']:>10.2f}x {r['torch_bsr_vs_torch_dense']:>13.2f}x | "
          f"{r['ours_vs_torch_bsr']:>9.2f}x")
  print("PyTorch CPU, ms per call from a Python loop (median); 'vs TF dense' = TF dense "
        "in-graph / torch bsr,\n'vs torch dense' = torch dense / torch bsr, "
        "'ours vs it' = torch bsr / ours in-graph")


def print_backward_table(rows):
  header = (f"{'K=N':>5} {'M':>4} {'spars':>5} {'blk':>3} | {'dx ours':>8} {'dense':>8} {'x':>6} | "
            f"{'dval ours':>9} {'dW dense':>8} {'x':>6} | {'step ours':>9} {'dense':>8} {'x':>6}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{_case(r)} | {r['dx_ours_ms']:>8.3f} {r['dx_dense_ms']:>8.3f} "
          f"{r['dx_ours_vs_dense']:>5.2f}x | {r['dvalues_ours_ms']:>9.3f} {r['dw_dense_ms']:>8.3f} "
          f"{r['dvalues_ours_vs_dense']:>5.2f}x | {r['step_ours_ms']:>9.3f} "
          f"{r['step_dense_ms']:>8.3f} {r['step_ours_vs_dense']:>5.2f}x")
  print("backward, in-graph net ms (median); dx = dy @ W^T, dval = our block-values gradient vs "
        "the dense weight gradient x^T @ dy,\nstep = forward + dx + weight gradient through "
        "GradientTape; 'x' = dense / ours")


def speed_up(row, name):
  """dense / name, or NaN (a gap in the plot) where either is within noise."""
  if {"dense", name} & set(row["within_noise"]):
    return float("nan")
  return row["dense_ms"] / row[name + "_ms"]


def plot(rows, path):
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib not installed: no plot")
    return
  # The target case when it was run, else the first case.
  key = lambda r: (r["k"], r["sparsity"], r["block"])  # noqa: E731
  first = next((r for r in rows if key(r) == TARGET), rows[0])
  target = [r for r in rows if key(r) == key(first)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ms = [r["m"] for r in target]
  contenders = list(METHODS[1:]) + (["torch_bsr"] if "torch_bsr_ms" in first else [])
  for name in contenders:
    axes[0].plot(ms, [speed_up(r, name) for r in target], "o-", label=name)
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[0].set(xscale="log", yscale="log", xlabel="M (rows of x)",
              ylabel="speed-up over dense tf.matmul (in-graph)",
              title=f"{first['k']}x{first['n']}, {first['sparsity']:.0%} block-sparse, "
              f"{first['block']}x{first['block']}")
  axes[0].legend(fontsize=8)
  for key, values, label in (("sparsity", SPARSITIES, "sparsity"), ("block", BLOCKS, "block")):
    for v in values:
      sel = [r for r in rows if r["k"] == 2048 and r[key] == v
             and (r["block"] == 16 if key == "sparsity" else r["sparsity"] == 0.9)]
      if sel and not (key == "block" and v == 16):
        axes[1].plot([r["m"] for r in sel], [speed_up(r, "ours") for r in sel], "o-",
                     label=f"{label} {v}")
  axes[1].set(xscale="log", yscale="log", xlabel="M (rows of x)",
              ylabel="ours: speed-up over dense",
              title="2048x2048: sparsity and block sweeps")
  if axes[1].lines:
    axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print("wrote", path)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--full", action="store_true", help="the whole grid (~40 min)")
  mode.add_argument("--quick", action="store_true", help="smoke run")
  parser.add_argument("--budget", type=float, default=0.15,
                      help="seconds per timed in-graph loop (default 0.15; per-call "
                      "loops get 2/3 of it)")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved rounds, medians reported (default 5, quick 3)")
  parser.add_argument("--backward-rows", default=None,
                      help="M values of the backward cases, e.g. 16,256 (default 256; "
                      "--full 1,16,64,256; 'none' skips)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contender")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)
  args.mode = "full" if args.full else "quick" if args.quick else "default"
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  if args.backward_rows is None:
    args.backward_rows = {"full": "1,16,64,256", "quick": "64"}.get(args.mode, "256")
  args.backward_rows = ([] if args.backward_rows == "none"
                        else [int(v) for v in args.backward_rows.split(",")])
  return args


def main(argv=None):
  args = parse_args(argv)
  # Every timer is its own tf.function: TF's retracing warnings are noise here.
  tf.get_logger().setLevel("ERROR")
  if not tfbs.ops.custom_ops_available():
    raise SystemExit("the compiled ops are not loaded: "
                     f"{tfbs.ops._loader.load_error()}")  # pylint: disable=protected-access
  meta = {**benchmarking.machine_meta(), "mode": args.mode, "repeats": args.repeats,
          "budget_s": args.budget, "statistic": "median of interleaved repeats",
          "per_call_target_us": PER_CALL_TARGET_US}
  torch, note = (None, "skipped (--no-torch)") if args.no_torch else import_torch()
  meta["torch"] = note or {"version": torch.__version__, "threads": torch.get_num_threads()}
  if note:
    print(note)
  rng = np.random.default_rng(0)
  rows, backward = [], []
  for case in cases(args.mode):
    rows.append(run_case(rng, *case, args=args, torch=torch))
    print(f"  done K={case[0]} M={case[1]} sparsity={case[2]} block={case[3]}", flush=True)
  for case in backward_cases(args.mode, args.backward_rows):
    backward.append(run_backward(rng, *case, args=args))
    print(f"  done backward K={case[0]} M={case[1]}", flush=True)
  report(rows, backward, torch is not None)
  save(meta, rows, backward, args)


def report(rows, backward, with_torch):
  for table in ([print_kernel_table, print_per_call_table] +
                ([print_torch_table] if with_torch else [])):
    print()
    table(rows)
  if backward:
    print()
    print_backward_table(backward)
  print_headline(rows)


def print_headline(rows):
  """One line per M at the issue's target case, when it was run."""
  target = [r for r in rows if (r["k"], r["sparsity"], r["block"]) == TARGET]
  if not target:
    return
  print(f"\ntarget {TARGET[0]}^2, {TARGET[1]:.0%}, {TARGET[2]}x{TARGET[2]}:")
  for r in target:
    extra = r["tf_function_extra_ours_minus_dense_us"]
    torch_text = (f", {r['ours_vs_torch_bsr']:.2f}x torch bsr" if "ours_vs_torch_bsr" in r
                  else "")
    print(f"  M={r['m']:>3}: in-graph {r['ours_vs_dense']:.2f}x dense tf.matmul, "
          f"GF/s ratio {r['gflops_ratio']:.2f}{torch_text}; per-call extra over dense "
          f"{extra:.0f} us (tf.function), {r['eager_extra_ours_minus_dense_us']:.0f} us "
          f"(eager), target <= {PER_CALL_TARGET_US:.0f}")


def save(meta, rows, backward, args):
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"bsr_matmul_cpu_{args.mode}")
  with open(path + ".json", "w") as f:
    json.dump({"meta": meta, "results": rows, "backward": backward}, f, indent=1)
  print("wrote", path + ".json")
  plot(rows, path + ".png")


if __name__ == "__main__":
  main()
