"""Block-sparse LSTM/GRU vs tf_keras LSTM/GRU: inference and training step.

For each cell, hidden size and batch, times (in one run, same process) the
dense tf_keras layer and our block-sparse layer at each block sparsity
(16x16 blocks by default, random block layout, input and recurrent kernels
both pruned; at sparsity 0 our layer keeps dense weights, as
`to_block_sparse` does, and runs the fused recurrence over all blocks), T = 100 steps, input width = hidden size. Inference is the
forward pass of a `tf.function`; the training step is forward + backward +
SGD update. Writes a table to stdout and `rnn.json` / `rnn.png` to
`--out` (default benchmarks/results/).

    python benchmarks/rnn.py                 # default grid (< 10 min, 2 cores)
    python benchmarks/rnn.py --quick         # smoke run, seconds
    python benchmarks/rnn.py --full          # the issue's whole grid (long)
    python benchmarks/rnn.py --cells lstm --hidden 1024 --batch 8 --no-train

Timings on a shared machine are noisy: within each (cell, hidden, batch) the
layers take turns for `--repeats` rounds and the median is reported. The
JSON's "meta" records the CPU, its flags, TF and the kernels' ISA.
"""

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tf_blocksparse import benchmarking

HERE = os.path.dirname(os.path.abspath(__file__))
DENSE = {"lstm": tf_keras.layers.LSTM, "gru": tf_keras.layers.GRU}
SPARSE = {"lstm": tfbs.layers.BlockSparseLSTM, "gru": tfbs.layers.BlockSparseGRU}


def _ints(text):
  return [int(v) for v in text.split(",")]


def _floats(text):
  return [float(v) for v in text.split(",")]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cells", default="lstm,gru")
  p.add_argument("--hidden", type=_ints, default=[512, 1024])
  p.add_argument("--batch", type=_ints, default=[8])
  p.add_argument("--time", type=int, default=100)
  p.add_argument("--sparsity", type=_floats, default=[0.0, 0.8, 0.9, 0.95])
  p.add_argument("--block", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-train", action="store_true", help="inference only")
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--full", action="store_true",
                 help="hidden 512/1024/2048, batch 1/8/32 (long)")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args(argv)
  if args.quick:
    args.hidden, args.batch, args.time = [128], [8], 20
    args.sparsity, args.repeats = [0.0, 0.9], 3
  if args.full:
    args.hidden, args.batch = [512, 1024, 2048], [1, 8, 32]
  args.cells = args.cells.split(",")
  for cell in args.cells:
    if cell not in DENSE:
      p.error(f"unknown cell {cell!r}; choose from {sorted(DENSE)}")
  return args


def block_prune(rng, w, block, sparsity):
  k, n = w.shape
  nbr, nbc = -(-k // block), -(-n // block)
  keep = np.zeros(nbr * nbc, bool)
  keep[rng.choice(nbr * nbc, size=int(round((1 - sparsity) * nbr * nbc)),
                  replace=False)] = True
  mask = np.kron(keep.reshape(nbr, nbc), np.ones([block, block]))[:k, :n]
  return (w * mask).astype(w.dtype)


def call_timer(fn):
  """Traces and warms up `fn`; the result times one more call of it, in ms."""
  fn()

  def once():
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3
  return once


def train_step(layer):
  """A tf.function: forward, backward and an SGD update of the layer."""
  opt = tf_keras.optimizers.SGD(1e-4)

  @tf.function
  def step(x):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf.square(layer(x)))
    grads = tape.gradient(loss, layer.trainable_weights)
    opt.apply_gradients(zip(grads, layer.trainable_weights))
    return loss
  return step


def layer_timers(layer, x, train):
  infer = tf.function(lambda x: layer(x))
  timers = {"infer_ms": call_timer(lambda: infer(x).numpy())}
  if train:
    step = train_step(layer)
    timers["train_ms"] = call_timer(lambda: step(x).numpy())
  return timers


def group_layers(rng, cell, hidden, x, args):
  """[(impl, sparsity, layer)]: the tf_keras layer, then ours at each sparsity."""
  dense = DENSE[cell](hidden)
  dense(x[:, :2])
  layers = [("tf_keras", 0.0, dense)]
  weights = dense.get_weights()
  for sparsity in args.sparsity:
    pruned = [block_prune(rng, w, args.block, sparsity) if w.ndim == 2
              else w for w in weights]
    dense.set_weights(pruned)
    # At 0% the weights stay dense (as to_block_sparse leaves them):
    # the fused recurrence still runs, over all blocks.
    keep = sparsity > 0
    layers.append(("block_sparse", sparsity, SPARSE[cell].from_dense_layer(
        dense, args.block, sparse_kernel=keep, sparse_recurrent=keep)))
  dense.set_weights(weights)  # the converted layers hold copies
  return layers


def run_group(rng, cell, hidden, batch, args):
  """Rows of one (cell, hidden, batch): all layers timed in interleaved turns.

  Timing tf_keras first and ours after would let the machine's drift
  between the two show up as a speed-up; taking turns spreads it evenly.
  """
  x = tf.constant(rng.standard_normal([batch, args.time, hidden]), tf.float32)
  layers = group_layers(rng, cell, hidden, x, args)
  timers = {}
  for i, (_, _, layer) in enumerate(layers):
    for key, timer in layer_timers(layer, x, not args.no_train).items():
      timers[f"{i}/{key}"] = timer
  medians, _ = benchmarking.interleaved_medians(timers, args.repeats)
  rows = []
  for i, (impl, sparsity, _) in enumerate(layers):
    times = {key: medians[f"{i}/{key}"] for key in ("infer_ms", "train_ms")
             if f"{i}/{key}" in medians}
    rows.append(dict(cell=cell, hidden=hidden, batch=batch, impl=impl,
                     sparsity=sparsity, **times))
    _print(rows[-1], rows[0])
  return rows


def run(args):
  rows = []
  rng = np.random.default_rng(0)
  for cell in args.cells:
    for hidden in args.hidden:
      for batch in args.batch:
        rows += run_group(rng, cell, hidden, batch, args)
  return rows


def _print(row, base):
  speed = base["infer_ms"] / row["infer_ms"]
  train = row.get("train_ms")
  train_text = (f"  train {train:9.1f} ms ({base['train_ms'] / train:5.2f}x)"
                if train else "")
  print(f"{row['cell']:4s} H={row['hidden']:5d} B={row['batch']:3d} "
        f"{row['impl']:12s} sparsity={row['sparsity']:.2f}  "
        f"infer {row['infer_ms']:9.1f} ms ({speed:5.2f}x){train_text}",
        flush=True)


def table(rows, meta):
  """A markdown table: times and speed-ups vs tf_keras of the same group."""
  lines = [f"T = {meta['time_steps']}, {meta['block']}x{meta['block']} blocks, "
           f"median of {meta['repeats']} interleaved runs, {meta['cpu_count']} CPU cores "
           f"({meta['note']})", "",
           "| cell | hidden | batch | layer | sparsity | inference ms | "
           "speed-up | train step ms | speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
  base = {}
  for r in rows:
    key = (r["cell"], r["hidden"], r["batch"])
    if r["impl"] == "tf_keras":
      base[key] = r
    b = base[key]
    train = r.get("train_ms")
    lines.append(
        f"| {r['cell']} | {r['hidden']} | {r['batch']} | {r['impl']} | "
        f"{r['sparsity']:.2f} | {r['infer_ms']:.1f} | "
        f"{b['infer_ms'] / r['infer_ms']:.2f}x | "
        + (f"{train:.1f} | {b['train_ms'] / train:.2f}x |" if train else "- | - |"))
  return "\n".join(lines) + "\n"


def save(rows, args):
  os.makedirs(args.out, exist_ok=True)
  # The CPU, its flags and the kernels' ISA: numbers from another machine or
  # build are not comparable without them.
  meta = {**benchmarking.machine_meta(),
          "time_steps": args.time, "block": args.block, "repeats": args.repeats,
          "cpu_count": os.cpu_count(),
          "note": "the layers of a group timed in turns"}
  with open(os.path.join(args.out, "rnn.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(args.out, "rnn.md"), "w") as f:
    f.write(table(rows, meta))
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("matplotlib not installed: no PNG written")
    return
  groups = sorted({(r["cell"], r["hidden"], r["batch"]) for r in rows})
  fig, ax = plt.subplots(figsize=(8, 5))
  for cell, hidden, batch in groups:
    sel = [r for r in rows if (r["cell"], r["hidden"], r["batch"]) == (cell, hidden, batch)]
    base = next(r for r in sel if r["impl"] == "tf_keras")["infer_ms"]
    ours = [r for r in sel if r["impl"] == "block_sparse"]
    ax.plot([r["sparsity"] for r in ours], [base / r["infer_ms"] for r in ours],
            marker="o", label=f"{cell} H={hidden} B={batch}")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.set_xlabel("block sparsity (16x16 blocks)")
  ax.set_ylabel("inference speed-up vs tf_keras (x)")
  ax.set_title(f"Block-sparse RNN inference, T={args.time}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "rnn.png"), dpi=100)


def main(argv=None):
  args = parse_args(argv)
  # Each layer's functions are traced anew: TF's retracing warnings are noise.
  tf.get_logger().setLevel("ERROR")
  rows = run(args)
  save(rows, args)


if __name__ == "__main__":
  main()
