"""What block pruning adds to a training step: pruned vs dense LSTM.

The same LSTM(1024) -> Dense model is trained dense and wrapped by
`prune_block_low_magnitude` (ConstantSparsity, 16 x 16 blocks, masks
updated every `--frequency` steps), on one device and under
MirroredStrategy with 2 logical CPU devices. A timed window is
`--frequency` steps, so it holds exactly one mask update; the four
configurations take turns for `--rounds` rounds and the median window is
kept. Writes a table to stdout and `pruning_overhead.json` to `--out`
(default benchmarks/results/).

    python benchmarks/pruning_overhead.py            # ~5 min on 2 cores
    python benchmarks/pruning_overhead.py --quick    # a smoke run

Each step is one `tf.function` call from Python: the pruning wrapper
synchronises replicas with a `merge_call`, which TF does not allow inside
an in-graph loop.
"""

import argparse
import json
import os
import sys
import time

import tensorflow as tf

# Two logical CPU devices, before TensorFlow initialises its devices.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_keras  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import tf_blocksparse as tfbs  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_blocksparse import benchmarking  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--units", type=int, default=1024)
  p.add_argument("--input", type=int, default=128, help="input features")
  p.add_argument("--time", type=int, default=10, help="time steps")
  p.add_argument("--batch", type=int, default=16, help="global batch")
  p.add_argument("--block", type=int, default=16)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--frequency", type=int, default=100)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--quick", action="store_true",
                 help="LSTM(128), frequency 10, 1 round")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args(argv)
  if args.quick:
    args.units, args.frequency, args.rounds = 128, 10, 1
  return args


def make_trainer(args, pruned, strategy):
  """A zero-argument callable running one training step of a model."""
  with strategy.scope():
    model = tf_keras.Sequential([
        tf_keras.Input((args.time, args.input)),
        tf_keras.layers.LSTM(args.units),
        tf_keras.layers.Dense(10)])
    if pruned:
      model = tfbs.prune_block_low_magnitude(
          model, block_size=args.block,
          pruning_schedule=tfbs.schedules.ConstantSparsity(
              args.sparsity, begin_step=0, frequency=args.frequency))
    optimizer = tf_keras.optimizers.SGD(1e-3)
  for layer in model.layers:   # what UpdatePruningStep does
    if isinstance(layer, tfbs.pruning.PruneBlockLowMagnitude):
      layer.pruning_step.assign(0)
  rng = np.random.RandomState(0)
  x = rng.randn(args.batch, args.time, args.input).astype(np.float32)
  y = rng.randn(args.batch, 10).astype(np.float32)
  data = tf.data.Dataset.from_tensors((x, y)).repeat()
  batches = iter(strategy.experimental_distribute_dataset(data))
  batch = next(batches)

  @tf.function
  def step(xy):
    def replica_step(xb, yb):
      with tf.GradientTape() as tape:
        loss = tf.nn.compute_average_loss(
            tf.reduce_mean(tf.square(model(xb, training=True) - yb), -1),
            global_batch_size=args.batch)
        loss += tf.nn.scale_regularization_loss(
            tf.add_n(model.losses) if model.losses else 0.0)
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
      return loss
    return strategy.run(replica_step, args=xy)

  def run():
    step(batch)
  return run, model


def time_window(run, steps):
  """Seconds for `steps` steps, a mask update among them."""
  t0 = time.perf_counter()
  for _ in range(steps):
    run()
  return time.perf_counter() - t0


def measure(args):
  strategies = {
      "one_device": tf.distribute.OneDeviceStrategy("/cpu:0"),
      "mirrored_2": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
  }
  trainers = {}
  for sname, strategy in strategies.items():
    for pruned in (False, True):
      run, model = make_trainer(args, pruned, strategy)
      for _ in range(3):   # trace, warm up
        run()
      trainers[(sname, pruned)] = (run, model)
  windows = {key: [] for key in trainers}
  for r in range(args.rounds):
    for key, (run, _) in trainers.items():
      windows[key].append(time_window(run, args.frequency))
      print(f"round {r + 1}/{args.rounds} {key[0]:10s} "
            f"{'pruned' if key[1] else 'dense':6s} "
            f"{1e3 * windows[key][-1] / args.frequency:8.2f} ms/step",
            flush=True)
  rows = []
  for sname in strategies:
    dense = float(np.median(windows[(sname, False)])) / args.frequency
    pruned = float(np.median(windows[(sname, True)])) / args.frequency
    model = trainers[(sname, True)][1]
    kernel = model.layers[0].masked_weights[0]
    rows.append({
        "strategy": sname, "dense_ms": 1e3 * dense, "pruned_ms": 1e3 * pruned,
        "overhead_pct": 100.0 * (pruned / dense - 1.0),
        "dense_windows_s": windows[(sname, False)],
        "pruned_windows_s": windows[(sname, True)],
        "reached_lstm_kernel_sparsity": float(
            1.0 - kernel.mask.numpy().mean())})
  return rows


def table(rows, args):
  lines = [f"LSTM({args.units}) -> Dense(10), T={args.time}, input "
           f"{args.input}, global batch {args.batch}, {args.block}x"
           f"{args.block} blocks at {args.sparsity:.0%}, mask update every "
           f"{args.frequency} steps (median of {args.rounds} windows of "
           f"{args.frequency} steps)", "",
           "| strategy | dense ms/step | pruned ms/step | overhead |",
           "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['strategy']} | {r['dense_ms']:.1f} | "
                 f"{r['pruned_ms']:.1f} | {r['overhead_pct']:+.1f} % |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  rows = measure(args)
  text = table(rows, args)
  print(text)
  os.makedirs(args.out, exist_ok=True)
  meta = {**benchmarking.machine_meta(), "cpu_count": os.cpu_count(),
          "load_average_after": os.getloadavg(),
          **{k: v for k, v in vars(args).items() if k != "out"},
          "target": "pruning adds <= 10 % to the step at frequency 100"}
  name = "pruning_overhead_quick.json" if args.quick else \
      "pruning_overhead.json"
  with open(os.path.join(args.out, name), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
