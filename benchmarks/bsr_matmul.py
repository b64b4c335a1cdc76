"""Benchmark: x @ W for a block-sparse W, ours against TensorFlow's paths.

Side by side in one run, for each case: dense `tf.matmul`, TF's CSR
`SparseMatrixMatMul`, `tf.sparse.sparse_dense_matmul`, our compiled op and
our pure-TF fallback. Each op is timed in an in-graph loop
(`tf_blocksparse.benchmarking.time_in_graph`), so Python dispatch is not
what is measured; the loop's own cost (~50 us an iteration on the 2-core
machine) is measured in the same run and subtracted: the table shows net
times and ratios, the JSON keeps the raw times too. Every method's result is
checked against numpy before it is timed. Prints a table, writes JSON and a
PNG plot.

  python benchmarks/bsr_matmul.py            # sweeps around 2048, 90 %, 16x16 (< 5 min)
  python benchmarks/bsr_matmul.py --full     # the whole grid of the issue
  python benchmarks/bsr_matmul.py --quick    # one matrix, a smoke run
"""

import argparse
import datetime
import json
import os
import platform

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops

import tf_blocksparse as tfbs
from tf_blocksparse import benchmarking

SIZES = (1024, 2048, 4096)
ROWS = (1, 16, 64, 256)
SPARSITIES = (0.5, 0.8, 0.9, 0.95)
BLOCKS = (4, 8, 16, 32)
METHODS = ("dense", "tf_csr", "tf_sparse_tensor", "ours", "ours_fallback")
TF_SPARSE = ("tf_csr", "tf_sparse_tensor")


def block_sparse_weight(rng, size, block, sparsity):
  nb = size // block
  mask = rng.permutation(nb * nb) >= round(sparsity * nb * nb)
  mask = mask.reshape(nb, nb)
  w = rng.standard_normal([size, size]).astype(np.float32)
  return w * np.kron(mask, np.ones([block, block], np.float32))


def make_ops(w, block):
  """One callable per method, each mapping x [M, K] to x @ W."""
  dense = tf.constant(w)
  matrix = tfbs.BlockSparseMatrix.from_dense(w, block)
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


def run_case(rng, size, rows, sparsity, block, budget_s):
  w = block_sparse_weight(rng, size, block, sparsity)
  ops = make_ops(w, block)
  x = tf.constant(rng.standard_normal([rows, size]).astype(np.float32))
  expected = x.numpy() @ w
  row = {"k": size, "n": size, "m": rows, "sparsity": sparsity, "block": block}
  row["loop_overhead_ms"] = benchmarking.loop_overhead_ms(x, budget_s)
  for name in METHODS:
    custom = name != "ours_fallback"
    with tfbs.ops.use_custom_ops(custom):
      got = tf.function(ops[name])(x).numpy()
    # A benchmark of a wrong answer is worthless: check every method.
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    raw = benchmarking.time_in_graph(ops[name], x, budget_s, custom_ops=custom)
    row[name + "_raw_ms"] = raw
    row[name + "_ms"] = max(raw - row["loop_overhead_ms"], 1e-4)
  best_tf_sparse = min(row[m + "_ms"] for m in TF_SPARSE)
  row["ours_vs_dense"] = row["dense_ms"] / row["ours_ms"]
  row["ours_vs_best_tf_sparse"] = best_tf_sparse / row["ours_ms"]
  row["best_tf_sparse_vs_dense"] = row["dense_ms"] / best_tf_sparse
  return row


def cases(mode):
  if mode == "full":
    return [(s, m, p, b) for s in SIZES for b in BLOCKS for p in SPARSITIES for m in ROWS]
  if mode == "quick":
    return [(1024, m, 0.9, 16) for m in (1, 64)]
  # Default: the target case and one sweep along each axis from it.
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


def print_table(rows):
  header = (f"{'K=N':>5} {'M':>4} {'spars':>5} {'blk':>3} | {'dense':>8} {'tf_csr':>8} "
            f"{'tf_sp':>8} {'ours':>8} {'fallbk':>8} | {'vs dense':>8} {'vs TFsp':>8}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['k']:>5} {r['m']:>4} {r['sparsity']:>5.2f} {r['block']:>3} | "
          f"{r['dense_ms']:>8.3f} {r['tf_csr_ms']:>8.3f} {r['tf_sparse_tensor_ms']:>8.3f} "
          f"{r['ours_ms']:>8.3f} {r['ours_fallback_ms']:>8.3f} | "
          f"{r['ours_vs_dense']:>7.1f}x {r['ours_vs_best_tf_sparse']:>7.1f}x")
  print("net ms per call (in-graph loop overhead subtracted); 'vs dense' = dense / ours,"
        " 'vs TFsp' = best TF sparse / ours")


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
  first = next((r for r in rows if key(r) == (2048, 0.9, 16)), rows[0])
  target = [r for r in rows if key(r) == key(first)]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ms = [r["m"] for r in target]
  for name in METHODS[1:]:
    axes[0].plot(ms, [r["dense_ms"] / r[name + "_ms"] for r in target], "o-", label=name)
  axes[0].axhline(1.0, color="gray", lw=0.8)
  axes[0].set(xscale="log", yscale="log", xlabel="M (rows of x)",
              ylabel="speed-up over dense tf.matmul",
              title=f"{first['k']}x{first['n']}, {first['sparsity']:.0%} block-sparse, "
              f"{first['block']}x{first['block']}")
  axes[0].legend()
  for key, values, label in (("sparsity", SPARSITIES, "sparsity"), ("block", BLOCKS, "block")):
    for v in values:
      sel = [r for r in rows if r["k"] == 2048 and r[key] == v
             and (r["block"] == 16 if key == "sparsity" else r["sparsity"] == 0.9)]
      if sel and not (key == "block" and v == 16):
        axes[1].plot([r["m"] for r in sel], [r["ours_vs_dense"] for r in sel], "o-",
                     label=f"{label} {v}")
  axes[1].set(xscale="log", xlabel="M (rows of x)", ylabel="ours: speed-up over dense",
              title="2048x2048: sparsity and block sweeps")
  if axes[1].lines:
    axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print("wrote", path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--full", action="store_true", help="the whole grid (~15 min)")
  mode.add_argument("--quick", action="store_true", help="smoke run")
  parser.add_argument("--budget", type=float, default=0.15,
                      help="seconds per timed loop (default 0.15)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  name = "full" if args.full else "quick" if args.quick else "default"
  if not tfbs.ops.custom_ops_available():
    raise SystemExit("the compiled ops are not loaded: build with "
                     "`pip install --no-build-isolation -e .` first")
  rng = np.random.default_rng(0)
  rows = []
  for case in cases(name):
    rows.append(run_case(rng, *case, budget_s=args.budget))
    print(f"  done K={case[0]} M={case[1]} sparsity={case[2]} block={case[3]}", flush=True)
  print()
  print_table(rows)
  os.makedirs(args.out, exist_ok=True)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
          "tensorflow": tf.__version__, "mode": name}
  with open(os.path.join(args.out, f"bsr_matmul_cpu_{name}.json"), "w") as f:
    json.dump({"meta": meta, "results": rows}, f, indent=1)
  plot(rows, os.path.join(args.out, f"bsr_matmul_cpu_{name}.png"))


if __name__ == "__main__":
  main()
