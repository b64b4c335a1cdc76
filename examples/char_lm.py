"""The main job: block-prune a character language model, compare, export.

A one-layer LSTM (or GRU, `--cell gru`) reads one-hot characters and
predicts the next one. Several variants are trained with `model.fit` on the
same data (Narang et al., 2017, at small scale):

- `dense`: the baseline;
- `thr{4,16}_{80,90}`: block pruning of the input and recurrent kernels with
  the paper's gradual threshold schedule (`GradualThreshold` with
  `target_sparsity`), 4x4 and 16x16 blocks, ~80 % and ~90 % of the blocks;
- `group_lasso`: group-lasso regularisation alone (4x4 blocks); afterwards
  the blocks it drove to zero (largest |w| below `GL_ZERO_TOL`) are zeroed;
- `glp`: group lasso while pruning (4x4 blocks, ~90 %);
- `poly4_90_out`: 4x4 blocks, 90 %, the logits layer too, cubic schedule
  early in training and a long fine-tune; `poly4_90_kd`: the same,
  distilled from the trained dense variant (`tfbs.distillation.Distiller`);
- `larger_pruned`: a model twice as wide, pruned (4x4 blocks) until it has
  no more non-zero parameters than the dense baseline.

Each variant is measured on the held-out test text: bits per character
(bpc), non-zero parameters, SavedModel and TFLite bytes (`tfbs.export`),
and inference time of the model converted with `tfbs.to_block_sparse`
(our BSR layers) against the dense tf_keras baseline, timed in one process.

The text is the standard library's `pydoc_data.topics` (~465 k characters,
on every Python) or `--text FILE`; it is split by position into train /
validation / test (90 / 5 / 5 %), the vocabulary is built from the train
part and other characters map to one "unknown" id.

    python examples/char_lm.py --quick --out runs/quick    # ~3 min, 2 cores
    python examples/char_lm.py --out runs/full             # see docs/RESULTS.md

Writes to `--out`: `results.json` (one object per variant), `results.md`
(the table), `bpc_vs_params.png`, `run.json` (settings, timings) and
`best/` (the best sparse model as a SavedModel and TFLite files).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np


@contextlib.contextmanager
def quiet_native_logs():
  """Keeps what TensorFlow's C++ code writes to stderr (the TFLite
  converter's MLIR passes, the SavedModel loader) off the console for the
  block: file descriptor 2 goes to a temporary file, Python's own stderr
  (warnings, tracebacks) stays on the console. If the block raises, the
  captured log is shown before the error. Only this example does this; the
  library leaves a user's logging alone."""
  sys.stderr.flush()
  console = os.dup(2)
  python_stderr = sys.stderr
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    sys.stderr = os.fdopen(os.dup(console), "w", buffering=1)
    try:
      yield
    except BaseException:
      sink.seek(0)
      sys.stderr.write(sink.read().decode(errors="replace")[-20000:])
      raise
    finally:
      sys.stderr.close()
      sys.stderr = python_stderr
      os.dup2(console, 2)
      os.close(console)


# TensorFlow's start-up lines (oneDNN, CUDA probing, CPU features): the
# console shows the run, not them.
with quiet_native_logs():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  import tf_blocksparse as tfbs  # pylint: disable=g-import-not-at-top
  from tf_blocksparse.benchmarking import time_in_graph  # pylint: disable=g-import-not-at-top
  from tf_blocksparse.pruning import block_masks  # pylint: disable=g-import-not-at-top
  tf.config.list_physical_devices()

RNN = {"lstm": tf_keras.layers.LSTM, "gru": tf_keras.layers.GRU}
GATES = {"lstm": 4, "gru": 3}
# Group lasso alone never reaches exact zeros with a stochastic optimizer:
# the blocks it switches off keep jittering at about the step size. Blocks
# whose largest |w| is below this are counted (and set) as zero.
GL_ZERO_TOL = 1e-3
# A variant is "sparse" (eligible for `best/`) from this block sparsity.
SPARSE_FROM = 0.5


# --------------------------------------------------------------------- data

def load_text(path=None):
  """The text of `path`, or of the standard library's pydoc topics."""
  if path:
    with open(path, encoding="utf-8", errors="replace") as f:
      return f.read()
  from pydoc_data import topics
  return "\n".join(topics.topics[key] for key in sorted(topics.topics))


def split_text(text, valid=0.05, test=0.05):
  """`(train, valid, test)` by position: the last `test` fraction is test."""
  n = len(text)
  n_test, n_valid = int(n * test), int(n * valid)
  n_train = n - n_valid - n_test
  if min(n_train, n_valid, n_test) < 2:
    raise ValueError(f"the text ({n} characters) is too short to split into "
                     f"train/valid/test; give a longer --text")
  return (text[:n_train], text[n_train:n_train + n_valid],
          text[n_train + n_valid:])


class Vocabulary:
  """Characters of the training text; id 0 stands for any other character."""

  def __init__(self, train_text):
    self.chars = sorted(set(train_text))
    self._ids = {c: i + 1 for i, c in enumerate(self.chars)}

  def __len__(self):
    return len(self.chars) + 1

  def encode(self, text):
    return np.array([self._ids.get(c, 0) for c in text], np.int32)


def windows(ids, length):
  """Non-overlapping `(inputs, next-character targets)`, `[n, length]`."""
  n = (len(ids) - 1) // length
  if n < 1:
    raise ValueError(f"{len(ids)} characters give no window of {length}; "
                     f"use a shorter --seq-len or a longer text")
  x = ids[:n * length].reshape(n, length)
  y = ids[1:n * length + 1].reshape(n, length)
  return x, y


def dataset(x, y, vocab_size, batch, shuffle_seed=None):
  ds = tf.data.Dataset.from_tensor_slices((x, y))
  if shuffle_seed is not None:
    ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch, drop_remainder=shuffle_seed is not None)
  return ds.map(lambda a, b: (tf.one_hot(a, vocab_size), b)).prefetch(2)


def bits_per_char(model, x, y, vocab_size, batch=64):
  """Mean over every target character of -log2 p(char); each window starts
  from a zero state."""
  total, count = 0.0, 0
  for start in range(0, len(x), batch):
    logits = model(tf.one_hot(x[start:start + batch], vocab_size),
                   training=False)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        y[start:start + batch], tf.cast(logits, tf.float32))
    total += float(tf.reduce_sum(ce))
    count += int(np.prod(ce.shape))
  return total / count / math.log(2.0)


# ----------------------------------------------------------------- variants

@dataclasses.dataclass
class Variant:
  name: str
  units: int
  block_size: tuple = None       # None: dense
  sparsity: float = None         # target block sparsity
  schedule: str = "threshold"    # "threshold" or "polynomial"
  group_lasso: float = 0.0       # λ (with pruning: GLP; alone: regulariser)
  prune: bool = True
  prune_output: bool = False     # the logits layer too, same blocks/schedule
  span: tuple = None             # pruning span (fractions), None: PRUNE_SPAN
  distill: bool = False          # trained towards the dense variant's logits


def variants(units, names, gl_strength, glp_strength, large_factor=2):
  """The variants named in `names`, in the order of the issue's table."""
  four, sixteen = (4, 4), (16, 16)
  every = [
      Variant("dense", units, prune=False),
      Variant("thr4_80", units, four, 0.8),
      Variant("thr4_90", units, four, 0.9),
      # Cubic schedule, pruned early and fine-tuned for 70 % of training,
      # logits layer too: the quick run's small model (measured best of
      # five spans on the quick settings).
      Variant("poly4_90_out", units, four, 0.9, schedule="polynomial",
              prune_output=True, span=(0.02, 0.1, 0.3)),
      # The same, distilled from the trained dense variant
      # (tfbs.distillation.Distiller, alpha 0.5, temperature 2).
      Variant("poly4_90_kd", units, four, 0.9, schedule="polynomial",
              prune_output=True, span=(0.02, 0.1, 0.3), distill=True),
      Variant("thr16_80", units, sixteen, 0.8),
      Variant("thr16_90", units, sixteen, 0.9),
      Variant("group_lasso", units, four, None, group_lasso=gl_strength,
              prune=False),
      Variant("glp", units, four, 0.9, group_lasso=glp_strength),
      Variant("larger_pruned", large_factor * units, four, None,
              schedule="polynomial"),
  ]
  known = {v.name: v for v in every}
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {list(known)}")
  return [known[n] for n in names]


def rnn_params(cell, units, inputs):
  """Weights of the input and recurrent kernels (the pruned ones)."""
  return GATES[cell] * units * (inputs + units)


def model_params(cell, units, vocab_size):
  """All parameters of `build_model` with dense weights."""
  bias = GATES[cell] * units * (2 if cell == "gru" else 1)   # reset_after
  return (rnn_params(cell, units, vocab_size) + bias +
          units * vocab_size + vocab_size)


def matched_sparsity(cell, units, large_units, vocab_size):
  """Block sparsity at which the `large_units` model's RNN kernels leave it
  no more non-zero parameters than the dense `units` model (rounded up to
  a whole per cent, so it never has more)."""
  budget = model_params(cell, units, vocab_size)
  other = model_params(cell, large_units, vocab_size) - rnn_params(
      cell, large_units, vocab_size)
  keep = (budget - other) / rnn_params(cell, large_units, vocab_size)
  if keep <= 0:
    raise ValueError(f"a {large_units}-unit model cannot be pruned down to "
                     f"the {units}-unit model's {budget} parameters")
  return min(math.ceil((1.0 - keep) * 100.0) / 100.0, 0.99)


# Where pruning starts, ramps (threshold schedule) and ends, as fractions of
# training; the rest fine-tunes at the final mask.
PRUNE_SPAN = (0.1, 0.3, 0.6)


def pruning_schedule(variant, sparsity, total_steps):
  """Pruning over the variant's span (default PRUNE_SPAN) of training."""
  start, ramp, end = (int(total_steps * f)
                      for f in (variant.span or PRUNE_SPAN))
  end = max(end, start + 1)
  frequency = max(1, total_steps // 100)
  if variant.schedule == "threshold":
    return tfbs.schedules.GradualThreshold(
        start_step=start, ramp_step=ramp, end_step=end, frequency=frequency,
        target_sparsity=sparsity)
  return tfbs.schedules.PolynomialDecay(
      initial_sparsity=0.0, final_sparsity=sparsity, begin_step=start,
      end_step=end, frequency=frequency)


def build_model(cell, units, vocab_size, variant=None, sparsity=None,
                total_steps=1, seed=0):
  """One-hot characters -> RNN (pruning-wrapped for a pruned variant) ->
  next-character logits."""
  tf_keras.utils.set_random_seed(seed)
  kwargs = {}
  if variant is not None and variant.group_lasso and not variant.prune:
    reg = tfbs.regularizers.GroupLasso(variant.group_lasso,
                                       variant.block_size, gates=GATES[cell])
    kwargs = dict(kernel_regularizer=reg, recurrent_regularizer=reg)
  rnn = RNN[cell](units, return_sequences=True, name="rnn", **kwargs)
  if variant is not None and variant.prune:
    rnn = tfbs.prune_block_low_magnitude(
        rnn, block_size=variant.block_size,
        pruning_schedule=pruning_schedule(variant, sparsity, total_steps),
        group_lasso=variant.group_lasso)
  logits = tf_keras.layers.Dense(vocab_size, name="logits")
  if variant is not None and variant.prune and variant.prune_output:
    logits = tfbs.prune_block_low_magnitude(
        logits, block_size=variant.block_size,
        pruning_schedule=pruning_schedule(variant, sparsity, total_steps))
  return tf_keras.Sequential([
      tf_keras.Input((None, vocab_size), name="chars"), rnn, logits])


def zero_small_blocks(model, block_size, gates, tol=GL_ZERO_TOL):
  """Zeroes the RNN kernel blocks whose largest |w| is below `tol`."""
  rnn = model.get_layer("rnn")
  for weight in (rnn.cell.kernel, rnn.cell.recurrent_kernel):
    reps = block_masks.representatives(weight, block_size, "max", gates)
    mask = block_masks.expand(tf.cast(reps >= tol, weight.dtype),
                              weight.shape, block_size)
    weight.assign(weight * mask)


# ----------------------------------------------------------------- measures

def block_sparsity(model, block_size):
  """Fraction of all-zero blocks over the RNN's input and recurrent kernels
  (per gate slice, partial edge blocks included, as `tfbs.sparsity_report`
  counts them); element sparsity for a dense variant (block_size None)."""
  report = tfbs.sparsity_report(model.get_layer("rnn"),
                                block_size=block_size or (1, 1),
                                print_fn=None)
  nonzero = sum(row["nonzero_blocks"] for row in report)
  return 1.0 - nonzero / sum(row["total_blocks"] for row in report)


def nonzero_params(model):
  return int(sum(np.count_nonzero(w) for w in model.get_weights()))


def directory_bytes(path):
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def export_sizes(model, directory, block_sparse="auto"):
  """Exports `model` (SavedModel, portable; TFLite) and returns the sizes.
  `block_sparse=False` for a model kept dense on purpose (the baseline)."""
  saved = os.path.join(directory, "saved_model")
  tfbs.export.export_saved_model(model, saved, overwrite=True,
                                 block_sparse=block_sparse)
  files = tfbs.export.export_tflite(model, os.path.join(directory, "model"),
                                    sequence_length=16, overwrite=True,
                                    block_sparse=block_sparse)
  return {"savedmodel_bytes": directory_bytes(saved),
          "savedmodel_variables_bytes": directory_bytes(
              os.path.join(saved, "variables")),
          "tflite_bytes": os.path.getsize(files["step"])}


def inference_ms(model, vocab_size, batch, length, budget_s):
  """Milliseconds for one forward pass over `[batch, length]` characters."""
  x = tf.one_hot(np.random.RandomState(0).randint(
      0, vocab_size, (batch, length)), vocab_size)
  return time_in_graph(lambda v: model(v, training=False), x,
                       budget_s=budget_s)


# ---------------------------------------------------------------------- run

def train_variant(variant, args, data, vocab_size, teacher=None):
  """Trains one variant; returns the stripped (dense-layer) model."""
  train_ds, valid_ds, steps_per_epoch = data
  total = args.epochs * steps_per_epoch
  sparsity = variant.sparsity
  if variant.name == "larger_pruned":
    sparsity = matched_sparsity(args.cell, args.units, variant.units,
                                vocab_size)
  model = build_model(args.cell, variant.units, vocab_size, variant, sparsity,
                      total, seed=args.seed)
  lr = tf_keras.optimizers.schedules.CosineDecay(args.lr, total, alpha=0.05)
  fitted = model
  if variant.distill:
    if teacher is None:
      raise ValueError(f"variant {variant.name} distills from the dense "
                       "variant, which must be trained first")
    fitted = tfbs.distillation.Distiller(model, teacher, alpha=0.5,
                                         temperature=2.0)
  fitted.compile(tf_keras.optimizers.Adam(lr, clipnorm=1.0),
                 tf_keras.losses.SparseCategoricalCrossentropy(
                     from_logits=True))
  callbacks = [tfbs.UpdatePruningStep()] if variant.prune else []
  print(f"\n=== {variant.name}: {args.cell.upper()}({variant.units})"
        + (f", {variant.block_size[0]}x{variant.block_size[1]} blocks"
           if variant.block_size else "")
        + (f", target block sparsity {sparsity:.2f}" if sparsity else "")
        + (f", group lasso {variant.group_lasso:g}"
           if variant.group_lasso else "")
        + (", distilled from dense" if variant.distill else ""), flush=True)
  fitted.fit(train_ds, epochs=args.epochs, validation_data=valid_ds,
             callbacks=callbacks, verbose=args.verbose)
  if variant.prune:
    model = tfbs.strip_block_pruning(model)
  elif variant.group_lasso:
    zero_small_blocks(model, variant.block_size, GATES[args.cell])
  return model, sparsity


def markdown_table(rows, cell):
  head = ("| variant | units | block | block sparsity | test bpc | vs dense "
          "| non-zero params | SavedModel | TFLite | inference speed-up |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    block = ("-" if r["block_size"] is None
             else f"{r['block_size'][0]}x{r['block_size'][1]}")
    lines.append(
        f"| {r['name']} | {cell.upper()}({r['units']}) | {block} | "
        f"{100 * r['block_sparsity']:.1f} % | {r['test_bpc']:.3f} | "
        f"{100 * r['bpc_change_vs_dense']:+.1f} % | {r['nonzero_params']:,} | "
        f"{r['savedmodel_bytes'] / 1e6:.2f} MB ({r['savedmodel_ratio']:.3f}x) "
        f"| {r['tflite_bytes'] / 1e6:.2f} MB ({r['tflite_ratio']:.3f}x) | "
        f"{r['speedup_vs_dense']:.2f}x |")
  return head + "\n".join(lines) + "\n"


def summary(rows, cell):
  """A few lines under the table: each variant against the dense one."""
  dense = rows[0]
  lines = [f"summary: dense {cell.upper()}({dense['units']}) "
           f"{dense['test_bpc']:.3f} test bpc"]
  for r in rows[1:]:
    lines.append(
        f"  {r['name']}: {100 * r['block_sparsity']:.0f} % blocks zero, "
        f"{100 * r['bpc_change_vs_dense']:+.1f} % bpc, "
        f"{r['nonzero_params'] / dense['nonzero_params']:.2f}x the non-zero "
        f"params, SavedModel {r['savedmodel_ratio']:.2f}x, TFLite "
        f"{r['tflite_ratio']:.2f}x, {r['speedup_vs_dense']:.1f}x as fast")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    marker = "s" if r["name"] == "dense" else "o"
    ax.scatter(r["nonzero_params"], r["test_bpc"], marker=marker)
    ax.annotate(r["name"], (r["nonzero_params"], r["test_bpc"]),
                textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("non-zero parameters")
  ax.set_ylabel("test bits per character")
  ax.set_title("Block-sparse character LM: quality vs size")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# The quick run trains on the whole text (the same split and test text as
# the full run) with short windows and small batches, for a fixed number of
# steps rather than epochs: its time is the steps', whatever the text's
# length. 1,632 steps (8 epochs of pydoc_data.topics) take about 40 s per
# LSTM(128) on 2 cores; a 300 kB text gets 12 epochs.
QUICK_STEPS = 1632
QUICK = dict(units=128, seq_len=64, batch=32, max_chars=0, lr=5e-3,
             variants="dense,poly4_90_out,larger_pruned")
FULL = dict(units=128, epochs=20, seq_len=100, batch=64, max_chars=0, lr=8e-3,
            variants="dense,thr4_80,thr4_90,poly4_90_out,poly4_90_kd,"
                     "thr16_80,thr16_90,"
                     "group_lasso,glp,larger_pruned")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help=f"short run: {QUICK}")
  p.add_argument("--out", default="char_lm_out", help="output folder")
  p.add_argument("--text", default=None,
                 help="UTF-8 text file (default: pydoc_data.topics)")
  p.add_argument("--cell", choices=sorted(RNN), default="lstm")
  p.add_argument("--units", type=int, help="hidden units of the baseline")
  p.add_argument("--epochs", type=int,
                 help=f"(quick: as many as make {QUICK_STEPS} steps)")
  p.add_argument("--seq-len", type=int)
  p.add_argument("--batch", type=int)
  p.add_argument("--max-chars", type=int,
                 help="use only the first N characters (0: all)")
  p.add_argument("--variants", help="comma-separated subset, in order")
  p.add_argument("--lr", type=float, default=None,
                 help="Adam learning rate, cosine decay to 5 %% (quick 5e-3, full 8e-3)")
  p.add_argument("--group-lasso", type=float, default=5e-4,
                 help="group-lasso strength λ of the group_lasso variant")
  p.add_argument("--glp-lasso", type=float, default=1e-4,
                 help="group-lasso strength λ of the glp variant (applied "
                      "only while pruning)")
  p.add_argument("--infer-batch", type=int, default=1)
  p.add_argument("--infer-len", type=int, default=100)
  p.add_argument("--time-budget", type=float, default=0.3,
                 help="seconds per timing loop")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--verbose", type=int, default=1,
                 help="model.fit verbosity (1: progress bars)")
  args = p.parse_args(argv)
  for key, value in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.variants = [v for v in args.variants.split(",") if v]
  if "dense" not in args.variants:
    args.variants.insert(0, "dense")   # every ratio is against it
  for key in ("units", "epochs", "seq_len", "batch"):
    if getattr(args, key) is not None and getattr(args, key) < 1:
      p.error(f"--{key.replace('_', '-')} must be >= 1")
  return args


def prepare_data(args):
  text = load_text(args.text)
  if args.max_chars:
    text = text[:args.max_chars]
  train, valid, test = split_text(text)
  vocab = Vocabulary(train)
  sets = [windows(vocab.encode(t), args.seq_len) for t in (train, valid, test)]
  steps_per_epoch = len(sets[0][0]) // args.batch
  if steps_per_epoch < 1:
    raise ValueError("the training text holds less than one batch; use a "
                     "smaller --batch or --seq-len, or a longer text")
  if args.epochs is None:   # the quick run: a budget of steps
    args.epochs = max(1, round(QUICK_STEPS / steps_per_epoch))
  train_ds = dataset(*sets[0], len(vocab), args.batch, shuffle_seed=args.seed)
  valid_ds = dataset(*sets[1], len(vocab), args.batch)
  return text, vocab, sets, (train_ds, valid_ds, steps_per_epoch)


def run(args):
  started = time.time()
  # Keras warns about retracing each new model's test function; expected
  # here, where every variant is a new model.
  tf.get_logger().setLevel("ERROR")
  os.makedirs(args.out, exist_ok=True)
  text, vocab, sets, data = prepare_data(args)
  v = len(vocab)
  print(f"text: {len(text):,} characters, vocabulary {v} "
        f"(train {len(sets[0][0]) * args.seq_len:,} / valid "
        f"{len(sets[1][0]) * args.seq_len:,} / test "
        f"{len(sets[2][0]) * args.seq_len:,} characters in windows of "
        f"{args.seq_len}); custom ops: "
        f"{tfbs.ops.custom_ops_available()}", flush=True)
  chosen = variants(args.units, args.variants, args.group_lasso,
                    args.glp_lasso)
  rows, models, timings, trained = [], {}, {}, {}
  scratch = tempfile.mkdtemp(prefix="char_lm_exports_")
  try:
    for variant in chosen:
      t0 = time.time()
      model, sparsity = train_variant(variant, args, data, v,
                                      teacher=trained.get("dense"))
      trained[variant.name] = model
      train_s = time.time() - t0
      bpc = bits_per_char(model, *sets[2], v)
      sparsity_reached = block_sparsity(model, variant.block_size)
      # Weights under SPARSE_FROM stay dense, in the tf_keras layers.
      fast = (tfbs.to_block_sparse(model, min_sparsity=SPARSE_FROM,
                                   block_size=variant.block_size)
              if variant.block_size and sparsity_reached >= SPARSE_FROM
              else model)
      # The fast model computes what the trained one does (up to rounding).
      probe = tf.one_hot(sets[2][0][:2], v)
      np.testing.assert_allclose(fast(probe).numpy(), model(probe).numpy(),
                                 rtol=1e-3, atol=1e-4)
      # A model left unconverted is measured as it is (dense).
      with quiet_native_logs():
        sizes = export_sizes(fast, os.path.join(scratch, variant.name),
                             block_sparse="auto" if fast is not model else False)
      models[variant.name] = fast
      row = {"name": variant.name, "cell": args.cell, "units": variant.units,
             "block_size": (list(variant.block_size) if variant.block_size
                            else None),
             "target_block_sparsity": sparsity,
             "block_sparsity": sparsity_reached,
             "test_bpc": bpc, "nonzero_params": nonzero_params(model),
             "total_params": int(sum(w.size for w in model.get_weights())),
             **sizes, "train_seconds": train_s}
      rows.append(row)
      print(f"--- {variant.name}: test bpc {bpc:.4f}, block sparsity "
            f"{row['block_sparsity']:.3f}, non-zero params "
            f"{row['nonzero_params']:,}, trained in {train_s:.0f} s",
            flush=True)
    # Timed last and side by side, in the same process and conditions.
    for name, model in models.items():
      timings[name] = inference_ms(model, v, args.infer_batch, args.infer_len,
                                   args.time_budget)
    dense = rows[0]
    for row in rows:
      row["bpc_change_vs_dense"] = row["test_bpc"] / dense["test_bpc"] - 1.0
      row["savedmodel_ratio"] = (row["savedmodel_bytes"] /
                                 dense["savedmodel_bytes"])
      row["savedmodel_variables_ratio"] = (
          row["savedmodel_variables_bytes"] /
          dense["savedmodel_variables_bytes"])
      row["tflite_ratio"] = row["tflite_bytes"] / dense["tflite_bytes"]
      row["inference_ms"] = timings[row["name"]]
      row["speedup_vs_dense"] = timings["dense"] / timings[row["name"]]
    sparse = [r for r in rows if r["block_sparsity"] >= SPARSE_FROM]
    best = min(sparse, key=lambda r: r["test_bpc"]) if sparse else None
    if best is not None:
      best_dir = os.path.join(args.out, "best")
      shutil.rmtree(best_dir, ignore_errors=True)
      shutil.copytree(os.path.join(scratch, best["name"]), best_dir)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  table = markdown_table(rows, args.cell)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table)
  plot(rows, os.path.join(args.out, "bpc_vs_params.png"))
  meta = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
          "settings": {k: getattr(args, k) for k in vars(args)},
          "vocabulary": v, "characters": len(text),
          "inference": {"batch": args.infer_batch, "length": args.infer_len,
                        "fast_path": "tfbs.to_block_sparse (BSR layers); "
                                     "dense: tf_keras"},
          "custom_ops": tfbs.ops.custom_ops_available(),
          "best_sparse": best["name"] if best else None,
          "seconds": time.time() - started,
          "tensorflow": tf.__version__}
  with open(os.path.join(args.out, "run.json"), "w") as f:
    json.dump(meta, f, indent=1)
  print("\n" + table)
  print(summary(rows, args.cell))
  if best:
    print(f"best sparse model: {best['name']} (test bpc "
          f"{best['test_bpc']:.3f}), exported to "
          f"{os.path.join(args.out, 'best')}")
  print(f"inference: batch {args.infer_batch} x {args.infer_len} characters; "
        f"results in {args.out} ({meta['seconds'] / 60:.1f} min)")
  return rows


def main(argv=None):
  run(parse_args(argv))


if __name__ == "__main__":
  main()
