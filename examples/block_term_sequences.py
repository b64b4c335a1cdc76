"""Dense vs block-term vs block-sparse LSTMs on sequences of 32x32 frames.

The task ("majority glyph"): each sequence is 8 frames of 1024 pixels; each
frame shows one digit glyph rendered with one of matplotlib's bundled fonts
(so the data exist on every machine with matplotlib), shifted by up to 2
pixels and covered in Gaussian noise. One digit appears in 4 of the 8
frames, 4 other digits once each; the label is the digit that appears most
often, so the model must recognise frames and count over time.

Frames are high dimensional, so the input-to-hidden matrix ([1024, 4H])
holds most of a dense LSTM's weights; that is the matrix the block-term
LSTM (Ye et al. 2018) compresses. Models, all with H = 64 unless noted:

- `dense`: tf_keras LSTM, the uncompressed reference.
- `dense-small`: tf_keras LSTM with H chosen so its weight count is close
  to the block-term LSTM's (a dense model of comparable size).
- `bt`: BlockTermLSTM, input modes (16, 8, 8), gate modes (8, 8, 4),
  rank 2, 2 blocks; dense recurrent matrix.
- `bt-bsr`: the same with a block-sparse recurrent matrix (16x16 blocks,
  25% kept, BSR variables and `bsr_matmul`).
- `block-sparse`: tf_keras LSTM whose input and recurrent kernels keep a
  fixed random 16x16 block mask (the mask is applied to the initial kernels
  and re-applied after every update by a kernel constraint), with the block
  density chosen so that the kept weights match the block-term LSTM. Its
  inference time is that of the dense kernels it runs on; only its weight
  count is sparse.

Parameters count trainable weights (masked-out entries excluded);
compression is the dense reference's count over the model's. Inference
time is the median of 3 timed passes over the test set (batch 256) after a
warm-up, in one compiled `tf.function`.

Usage:
  python examples/block_term_sequences.py --out /tmp/bt_run
  python examples/block_term_sequences.py --quick --out /tmp/bt_smoke

Writes `results.json` and `block_term_sequences.png` to `--out` and prints
a markdown table.
"""

import argparse
import json
import math
import os
import time

import numpy as np

FRAME = 32
STEPS = 8
UNITS = 64
CLASSES = 10
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
         "DejaVuSans-Bold.ttf", "STIXGeneral.ttf")


def render_glyphs(size=FRAME):
  """`[fonts, 10, size, size]` digit images in [0, 1] (ink = 1)."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.font_manager import FontProperties

  font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
  glyphs = np.zeros([len(FONTS), CLASSES, size, size], np.float32)
  for f, font in enumerate(FONTS):
    prop = FontProperties(fname=os.path.join(font_dir, font), size=1.6 * size)
    for digit in range(CLASSES):
      fig = Figure(figsize=(1, 1), dpi=size)
      canvas = FigureCanvasAgg(fig)
      fig.text(0.5, 0.5, str(digit), ha="center", va="center",
               fontproperties=prop)
      canvas.draw()
      glyphs[f, digit] = 1.0 - np.asarray(canvas.buffer_rgba())[..., 0] / 255.0
  return glyphs


def make_sequences(glyphs, count, rng, noise=0.35, shift=2):
  """`x [count, STEPS, FRAME*FRAME]`, `y [count]` for the majority task."""
  x = np.zeros([count, STEPS, FRAME, FRAME], np.float32)
  y = rng.integers(0, CLASSES, size=count)
  for n in range(count):
    others = rng.permutation([d for d in range(CLASSES) if d != y[n]])[:STEPS // 2]
    digits = rng.permutation(np.concatenate([[y[n]] * (STEPS // 2), others]))
    for t, digit in enumerate(digits):
      frame = glyphs[rng.integers(len(glyphs)), digit]
      dy, dx = rng.integers(-shift, shift + 1, size=2)
      x[n, t] = np.roll(frame, (dy, dx), axis=(0, 1))
  x += rng.normal(scale=noise, size=x.shape).astype(np.float32)
  return x.reshape(count, STEPS, FRAME * FRAME), y


class BlockMask:
  """Keeps a fixed random block layout of a `[rows, cols]` kernel."""

  def __init__(self, rows, cols, block, density, rng):
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    keep = rng.random(grid) < density
    self.mask = np.kron(keep, np.ones([block, block]))[:rows, :cols].astype(
        np.float32)

  @property
  def kept(self):
    return int(self.mask.sum())


def build_models(args, input_dim, rng):
  import tensorflow as tf
  import tf_keras

  import tf_blocksparse as tfbs

  def classifier(rnn):
    return tf_keras.Sequential([tf_keras.Input([STEPS, input_dim]), rnn,
                                tf_keras.layers.Dense(CLASSES)])

  in_modes = tfbs.block_term.factorize_shape(input_dim, 3)
  bt_args = dict(input_modes=in_modes, rank=args.rank, num_blocks=args.blocks)
  models = {
      "dense": classifier(tf_keras.layers.LSTM(UNITS)),
      "bt": classifier(tfbs.layers.BlockTermLSTM(UNITS, **bt_args)),
      "bt-bsr": classifier(tfbs.layers.BlockTermLSTM(
          UNITS, recurrent_block_size=16, recurrent_density=0.25,
          recurrent_mask_seed=args.seed, **bt_args)),
  }
  bt_weights = trainable_count(models["bt"].layers[0])

  # Dense LSTM of comparable size: 4H(I + H + 1) closest to the BT count.
  small = min(range(1, UNITS + 1),
              key=lambda h: abs(4 * h * (input_dim + h + 1) - bt_weights))
  models["dense-small"] = classifier(tf_keras.layers.LSTM(small))

  # Block-sparse LSTM with as many kept weights as the BT LSTM has.
  gates = 4 * UNITS
  density = (bt_weights - gates) / ((input_dim + UNITS) * gates)
  kernel_mask = BlockMask(input_dim, gates, 16, density, rng)
  recurrent_mask = BlockMask(UNITS, gates, 16, density, rng)

  class Masked(tf_keras.constraints.Constraint):

    def __init__(self, mask):
      self.mask = tf.constant(mask)

    def __call__(self, w):
      return w * self.mask

  sparse = tf_keras.layers.LSTM(
      UNITS, kernel_constraint=Masked(kernel_mask.mask),
      recurrent_constraint=Masked(recurrent_mask.mask))
  models["block-sparse"] = classifier(sparse)
  models["block-sparse"].build([None, STEPS, input_dim])
  kernel, recurrent, bias = sparse.get_weights()
  sparse.set_weights([kernel * kernel_mask.mask,
                      recurrent * recurrent_mask.mask, bias])
  masked_out = (kernel_mask.mask.size - kernel_mask.kept +
                recurrent_mask.mask.size - recurrent_mask.kept)
  return models, {"block-sparse": masked_out}, small


def trainable_count(layer):
  return int(sum(np.prod(w.shape) for w in layer.trainable_weights))


def time_inference(model, x, repeats=3):
  import tensorflow as tf
  fn = tf.function(lambda batch: model(batch, training=False))
  batches = [x[i:i + 256] for i in range(0, len(x), 256)]
  for b in batches[:1]:
    fn(b)  # trace + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for b in batches:
      fn(b).numpy()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run(args):
  import tensorflow as tf
  import tf_keras

  tf_keras.utils.set_random_seed(args.seed)
  rng = np.random.default_rng(args.seed)
  glyphs = render_glyphs()
  x_train, y_train = make_sequences(glyphs, args.train, rng)
  x_test, y_test = make_sequences(glyphs, args.test, rng)
  input_dim = x_train.shape[-1]
  models, masked_out, small_units = build_models(args, input_dim, rng)

  results = []
  reference = None
  order = ["dense", "dense-small", "bt", "bt-bsr", "block-sparse"]
  for name in order:
    model = models[name]
    model.compile(tf_keras.optimizers.Adam(args.lr),
                  tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch, epochs=args.epochs,
              verbose=0)
    train_s = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    rnn = model.layers[0]
    params = trainable_count(model) - masked_out.get(name, 0)
    rnn_params = trainable_count(rnn) - masked_out.get(name, 0)
    if name == "dense":
      reference = rnn_params
    row = {
        "model": name,
        "units": int(rnn.units if hasattr(rnn, "units") else rnn.cell.units),
        "accuracy": float(accuracy),
        "params": int(params),
        "rnn_params": int(rnn_params),
        "compression": reference / rnn_params,
        "input_kernel_compression": float(getattr(rnn, "compression_ratio", 1.0)),
        "inference_s": time_inference(model, x_test,
                                      repeats=1 if args.quick else 3),
        "train_s": train_s,
    }
    results.append(row)
    print(f"{name}: accuracy {accuracy:.3f}, {rnn_params} RNN weights, "
          f"trained in {train_s:.1f} s", flush=True)
  return results, small_units


def markdown(results):
  lines = ["| model | H | test accuracy | RNN weights | compression vs dense "
           "| input-kernel compression | inference (s) |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['model']} | {r['units']} | {r['accuracy']:.3f} | "
                 f"{r['rnn_params']:,} | {r['compression']:.1f}x | "
                 f"{r['input_kernel_compression']:.1f}x | {r['inference_s']:.3f} |")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for r in results:
    ax1.scatter(r["rnn_params"], r["accuracy"], s=60)
    ax1.annotate(r["model"], (r["rnn_params"], r["accuracy"]),
                 textcoords="offset points", xytext=(5, 5))
  ax1.set_xscale("log")
  ax1.set_xlabel("RNN weights (log)")
  ax1.set_ylabel("test accuracy")
  ax1.set_title("majority-glyph sequences, 8 x 1024-pixel frames")
  names = [r["model"] for r in results]
  ax2.bar(names, [1e3 * r["inference_s"] for r in results])
  ax2.set_ylabel("inference over the test set (ms)")
  ax2.tick_params(axis="x", rotation=30)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: little data, one epoch")
  parser.add_argument("--train", type=int, default=3000)
  parser.add_argument("--test", type=int, default=1000)
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--rank", type=int, default=2)
  parser.add_argument("--blocks", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.quick:
    args.train, args.test, args.epochs = 128, 64, 1
  os.makedirs(args.out, exist_ok=True)
  results, small_units = run(args)
  table = markdown(results)
  print(table)
  payload = {"task": "majority glyph", "frames": STEPS,
             "frame_pixels": FRAME * FRAME, "train": args.train,
             "test": args.test, "epochs": args.epochs, "rank": args.rank,
             "num_blocks": args.blocks, "dense_small_units": small_units,
             "quick": args.quick, "results": results}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(payload, f, indent=2)
  plot(results, os.path.join(args.out, "block_term_sequences.png"))
  return payload


if __name__ == "__main__":
  main()
