"""Demo: a block-sparse weight, one multiply, and its speed against dense.

Builds a 2048 x 2048 weight that is 90 % zero in 16 x 16 blocks, stores it
as a `BlockSparseMatrix`, checks `bsr_matmul` against dense `tf.matmul`, and
times both for a few batch sizes (in-graph loops, loop cost subtracted).

  python examples/bsr_demo.py [--size 2048] [--sparsity 0.9] [--block 16]
"""

import argparse

import numpy as np
import tensorflow as tf

import tf_blocksparse as tfbs
from tf_blocksparse import benchmarking


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=2048)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--block", type=int, default=16)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  nb = args.size // args.block
  keep = (rng.permutation(nb * nb) >= round(args.sparsity * nb * nb)).reshape(nb, nb)
  dense = rng.standard_normal([args.size, args.size]).astype(np.float32)
  dense *= np.kron(keep, np.ones([args.block, args.block], np.float32))
  matrix = tfbs.BlockSparseMatrix.from_dense(dense, args.block)
  print(f"weight {args.size}x{args.size}, {args.block}x{args.block} blocks: "
        f"{int(matrix.num_blocks)} of {nb * nb} blocks stored "
        f"(block density {float(matrix.density):.3f}), "
        f"{int(matrix.nbytes) / 1e6:.2f} MB in BSR vs {dense.nbytes / 1e6:.2f} MB dense")
  print("compiled kernels:", "yes" if tfbs.ops.custom_ops_available()
        else "NO (pure-TF fallback)")

  w = tf.constant(dense)
  print(f"\n{'M':>5} {'max |err|':>10} {'dense ms':>9} {'bsr ms':>9} {'speed-up':>9}")
  for rows in (1, 16, 64, 256):
    x = tf.constant(rng.standard_normal([rows, args.size]).astype(np.float32))
    err = np.abs(tfbs.ops.bsr_matmul(x, matrix).numpy() - x.numpy() @ dense).max()
    overhead = benchmarking.loop_overhead_ms(x)
    t_dense = benchmarking.time_in_graph(lambda v: tf.matmul(v, w), x) - overhead
    t_bsr = benchmarking.time_in_graph(lambda v: tfbs.ops.bsr_matmul(v, matrix), x) - overhead
    print(f"{rows:>5} {err:>10.2e} {t_dense:>9.3f} {t_bsr:>9.3f} {t_dense / t_bsr:>8.1f}x")


if __name__ == "__main__":
  main()
