"""Compare builds of the op library: in-graph kernel times, new / old.

Two builds register the same op names, so they cannot share one process.
Each build is timed by a worker subprocess (this script with `--worker`)
whose PYTHONPATH points at a checkout holding its own built
`tf_blocksparse/ops/_tf_blocksparse_ops*.so`, with optional environment
variables (e.g. TF_BLOCKSPARSE_ISA=avx2 to force the AVX2 kernels). A worker
checks the ops against numpy, times each case's forward op
(TfbsBsrMatmul), dx (TfbsBsrMatmulTransposed), dvalues
(TfbsBsrMatmulValuesGrad) and dense tf.matmul in in-graph loops (the loop's
own cost subtracted) and prints JSON. The driver runs the workers in
alternating order for `--rounds` rounds, takes each build's median over the
rounds and prints the ratios to the first build: time ratio < 1 means
faster than the baseline. Dense tf.matmul is the same TensorFlow in every
worker; its ratio (~1.00) shows how much the machine drifted.

Build the old library next to the new one (an in-place build of a copy of
the committed main; CUDA off since only CPU kernels are compared; ~45 s on
2 cores):

  mkdir -p /tmp/main_old && git archive HEAD | tar -x -C /tmp/main_old
  (cd /tmp/main_old && TF_BLOCKSPARSE_CUDA=0 python setup.py build_ext --inplace)

(or `git worktree add --detach /tmp/main_old HEAD` instead of the first
line; then `git worktree remove --force /tmp/main_old` when done). Then,
from the new checkout (whose library is built as usual):

  python benchmarks/compare_builds.py \\
      --build old=/tmp/main_old --build new=. \\
      --build new_avx2=.:TF_BLOCKSPARSE_ISA=avx2 --out /tmp/compare.json

A build is NAME=PATH[:VAR=VALUE...]. `--quick` runs two cases, two rounds
(~2 min for three builds); the default 16 cases (2048^2: 90 % at blocks
4/16/32 and 50 % at block 16, M = 1/16/64/256) and 5 rounds take ~30 s
a worker on 2 cores, ~8 min for three builds.
The worker loads this checkout's tf_blocksparse/benchmarking.py by path,
so an old checkout without its newer helpers can still be timed.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OPS = ("fwd", "dx", "dvalues", "dense")
SHORT = {"dvalues": "dval"}
QUICK_CASES = [(2048, 1, 0.9, 16), (2048, 256, 0.9, 16)]
DEFAULT_CASES = ([(2048, m, 0.9, 16) for m in (1, 16, 64, 256)] +
                 [(2048, m, 0.9, b) for b in (4, 32) for m in (1, 16, 64, 256)] +
                 [(2048, m, 0.5, 16) for m in (1, 16, 64, 256)])


# --- Worker: one build, in its own process ------------------------------


def load_benchmarking():
  """This checkout's benchmarking.py, whichever tf_blocksparse is imported."""
  spec = importlib.util.spec_from_file_location(
      "_tfbs_benchmarking", os.path.join(REPO, "tf_blocksparse", "benchmarking.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def case_inputs(size, rows, sparsity, block):
  """The same weight and inputs in every worker: seeded by the case."""
  rng = np.random.default_rng([size, rows, int(sparsity * 1000), block])
  nb = size // block
  mask = (rng.permutation(nb * nb) >= round(sparsity * nb * nb)).reshape(nb, nb)
  w = rng.standard_normal([size, size]).astype(np.float32)
  w *= np.kron(mask, np.ones([block, block], np.float32))
  x = rng.standard_normal([rows, size]).astype(np.float32)
  dy = rng.standard_normal([rows, size]).astype(np.float32)
  return w, x, dy


def case_ops(tf, tfbs, lib, w, block, x, dy):
  """op -> (fn, its timed input, numpy expectation), on the raw ops."""
  m = tfbs.BlockSparseMatrix.from_dense(w, block)
  bsr = (m.values, m.col_indices, m.row_ptr, tf.constant(m.shape, tf.int64))
  dense, xt, dyt = tf.constant(w), tf.constant(x), tf.constant(dy)
  b = block
  dw = (x.T @ dy).reshape(w.shape[0] // b, b, w.shape[1] // b, b).transpose(0, 2, 1, 3)
  rows = np.repeat(np.arange(w.shape[0] // b), np.diff(m.row_ptr.numpy()))
  return {
      "fwd": (lambda v: lib.tfbs_bsr_matmul(v, *bsr), xt, x @ w),
      "dx": (lambda g: lib.tfbs_bsr_matmul_transposed(g, *bsr), dyt, dy @ w.T),
      "dvalues": (lambda v: lib.tfbs_bsr_matmul_values_grad(v, dyt, *bsr), xt,
                  dw[rows, m.col_indices.numpy()]),
      "dense": (lambda v: tf.matmul(v, dense), xt, x @ w),
  }


def time_case(tf, tfbs, lib, bench, case, budget_s, repeats):
  size, rows, sparsity, block = case
  w, x, dy = case_inputs(*case)
  ops = case_ops(tf, tfbs, lib, w, block, x, dy)
  timers = {"loop_overhead": bench.in_graph_timer(tf.identity, tf.constant(x), budget_s)}
  for name, (fn, arg, expected) in ops.items():
    got = tf.function(fn)(arg).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-3 * np.abs(expected).max(), err_msg=name)
    timers[name] = bench.in_graph_timer(fn, arg, budget_s)
  medians, _ = bench.interleaved_medians(timers, repeats)
  row = {"k": size, "m": rows, "sparsity": sparsity, "block": block,
         "loop_overhead_ms": medians["loop_overhead"]}
  for name in ops:
    row[name + "_ms"] = max(medians[name] - medians["loop_overhead"], 1e-4)
  return row


def worker(cases, budget_s, repeats):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tf_blocksparse as tfbs  # pylint: disable=import-outside-toplevel
  from tf_blocksparse.ops import _loader  # pylint: disable=import-outside-toplevel
  tf.get_logger().setLevel("ERROR")
  lib = _loader._load()  # pylint: disable=protected-access
  if lib is None:
    raise SystemExit(f"no compiled ops: {_loader.load_error()}")
  bench = load_benchmarking()
  meta = {**bench.machine_meta(), "tf_blocksparse": os.path.dirname(tfbs.__file__)}
  rows = [time_case(tf, tfbs, lib, bench, tuple(c), budget_s, repeats) for c in cases]
  print("RESULT " + json.dumps({"meta": meta, "results": rows}), flush=True)


# --- Driver: alternate the workers, medians, ratios ---------------------


def parse_build(text):
  """NAME=PATH[:VAR=VALUE...] -> (name, absolute path, env overrides)."""
  name, _, rest = text.partition("=")
  path, *pairs = rest.split(":")
  if not name or not path:
    raise argparse.ArgumentTypeError(f"expected NAME=PATH[:VAR=VALUE...], got {text!r}")
  env = dict(p.split("=", 1) for p in pairs)
  return name, os.path.abspath(path), env


def run_worker(build, cases, args):
  name, path, env_extra = build
  env = {**os.environ, "PYTHONPATH": path, **env_extra}
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cases", json.dumps(cases),
         "--budget", str(args.budget), "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode or not lines:
    raise SystemExit(f"worker {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  result = json.loads(lines[-1][len("RESULT "):])
  check_library(name, path, result["meta"])
  return result


def check_library(name, path, meta):
  # A PYTHONPATH that did not take effect would time the installed build.
  lib = meta.get("op_library") or ""
  if not os.path.realpath(lib).startswith(os.path.realpath(path) + os.sep):
    raise SystemExit(f"build {name}: loaded {lib!r}, not a library under {path}")


def drive(builds, cases, args):
  """{build name: [worker result per round]}, build order rotated each round."""
  runs = {b[0]: [] for b in builds}
  for r in range(args.rounds):
    shift = r % len(builds)
    for build in builds[shift:] + builds[:shift]:
      runs[build[0]].append(run_worker(build, cases, args))
      print(f"  round {r + 1}/{args.rounds}: {build[0]} done", flush=True)
  return runs


def summarise(runs, cases):
  """Per build and case, the median of each op's time over the rounds."""
  summary = {}
  for name, results in runs.items():
    summary[name] = []
    for i, case in enumerate(cases):
      row = dict(zip(("k", "m", "sparsity", "block"), case))
      for op in OPS:
        row[op + "_ms"] = float(np.median([res["results"][i][op + "_ms"] for res in results]))
      summary[name].append(row)
  return summary


def print_ratios(summary, names):
  base = names[0]
  width = max([5] + [len(n) for n in names])
  header = (f"{'K=N':>5} {'M':>4} {'spars':>5} {'blk':>3} | {'fwd ms':>8} {'dx ms':>8} "
            f"{'dval ms':>8} {'dense ms':>8} | {'build':<{width}} " +
            " ".join(f"{SHORT.get(op, op):>7}" for op in OPS))
  print(f"baseline {base}: its in-graph ms (median over rounds); then each build's time / "
        f"{base}'s (< 1 is faster; dense tf.matmul is the same in all: the drift control)")
  print(header)
  print("-" * len(header))
  for i, b in enumerate(summary[base]):
    lead = (f"{b['k']:>5} {b['m']:>4} {b['sparsity']:>5.2f} {b['block']:>3} | " +
            " ".join(f"{b[op + '_ms']:>8.3f}" for op in OPS) + " | ")
    for n in names[1:]:
      ratios = " ".join(f"{summary[n][i][op + '_ms'] / b[op + '_ms']:>6.2f}x" for op in OPS)
      print(f"{lead}{n:<{width}} {ratios}")
      lead = " " * (len(lead) - 2) + "| "


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  p.add_argument("--build", action="append", type=parse_build, default=[],
                 help="NAME=PATH[:VAR=VALUE...]; the first is the baseline")
  p.add_argument("--rounds", type=int, default=None, help="default 5 (quick 2)")
  p.add_argument("--repeats", type=int, default=1,
                 help="interleaved repeats inside a worker (default 1)")
  p.add_argument("--budget", type=float, default=0.1, help="seconds per timed loop")
  p.add_argument("--quick", action="store_true", help="two cases, two rounds")
  p.add_argument("--out", help="write all rounds and the medians as JSON here")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--cases", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rounds is None:
    args.rounds = 2 if args.quick else 5
  if not args.worker and len(args.build) < 2:
    p.error("give at least two --build NAME=PATH")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    worker(json.loads(args.cases), args.budget, args.repeats)
    return
  cases = QUICK_CASES if args.quick else DEFAULT_CASES
  runs = drive(args.build, cases, args)
  summary = summarise(runs, cases)
  print()
  for name, results in runs.items():
    meta = results[0]["meta"]
    info = meta.get("kernel_info") or {}
    print(f"{name}: {meta['op_library']}\n  isa={info.get('isa', '(no kernel_info)')} "
          f"({info.get('reason', '')}), TF_BLOCKSPARSE_ISA={meta.get('TF_BLOCKSPARSE_ISA')}")
  print_ratios(summary, [b[0] for b in args.build])
  if args.out:
    with open(args.out, "w") as f:
      # "meta": the machine (CPU model, flags) once; each build's kernel
      # ISA is in its rounds' meta.
      json.dump({"meta": runs[args.build[0][0]][0]["meta"],
                 "builds": {b[0]: {"path": b[1], "env": b[2]} for b in args.build},
                 "rounds": runs, "medians": summary}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
  main()
