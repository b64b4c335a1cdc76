"""Quantized block-sparse TFLite files of the char-LM against the stock ones.

Trains the main job's `poly4_90_out` char-LM (LSTM, 4x4 blocks, 90 % of the
blocks of the LSTM's kernels and of the logits layer pruned; the quick
settings of `examples/char_lm.py`), then writes:

- `stock_float`: the stock converter on the trained Keras model (its LSTM
  becomes UNIDIRECTIONAL_SEQUENCE_LSTM; weights stored dense);
- `stock_int8`: the same with full-integer quantization (same calibration);
- ours, `tfbs.export.export_tflite` on the block-sparse model: `float`,
  `dynamic` (int8 weights) and `int8` (int8 weights and activations,
  calibrated on training sequences), the int8 one also with per-channel
  scales (`int8_per_channel`).

For each: step-file bytes and the ratio to `stock_float`; test bpc through
LiteRT (ours by the step file, frame by frame, each test window from zero
states, exactly as the Keras evaluation; the stock files by whole windows),
against the float sparse file; and LiteRT latency per step, one thread,
medians of interleaved repeats (ours: one step-file invoke; stock: a whole
window / its length), with the builtin kernels and, where the file allows
it, LiteRT's default XNNPACK delegate. Writes a table and
`tflite_quantized.json` (with the CPU) to `--out`.

    python benchmarks/tflite_quantized.py            # ~4 min on 2 cores
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tf_keras

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import char_lm  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_blocksparse as tfbs  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_blocksparse import benchmarking  # pylint: disable=g-import-not-at-top,wrong-import-position
from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top,wrong-import-position
from ai_edge_litert.interpreter import OpResolverType  # pylint: disable=g-import-not-at-top,wrong-import-position

OURS = ("float", "dynamic", "int8", "int8_per_channel")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="poly4_90_out")
  p.add_argument("--epochs", type=int, default=None,
                 help="training epochs (default: char_lm's quick run)")
  p.add_argument("--calibration", type=int, default=32,
                 help="training windows to calibrate the int8 files on")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  return p.parse_args(argv)


def interpreter(path, xnnpack):
  kwargs = {"num_threads": 1}
  if not xnnpack:
    kwargs["experimental_op_resolver_type"] = (
        OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  return Interpreter(model_path=path, **kwargs)


def bpc_from_logits(logits, targets):
  logits = logits - logits.max(axis=-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
  picked = np.take_along_axis(log_p, targets[..., None], axis=-1)
  return float(-picked.mean() / math.log(2.0))


def step_file_bpc(path, model, x_ids, y_ids, vocab):
  """bpc of a step file: each window frame by frame from zero states."""
  runner = interpreter(path, xnnpack=False).get_signature_runner("step")
  names = tfbs.export.state_names(model)
  units = {n: model.get_layer(n.rsplit("_", 1)[0]).cell.units for n in names}
  eye = np.eye(vocab, dtype=np.float32)
  logits = np.zeros(list(x_ids.shape) + [vocab], np.float32)
  for w, window in enumerate(x_ids):
    states = {n: np.zeros([1, u], np.float32) for n, u in units.items()}
    for t, char in enumerate(window):
      out = runner(chars=eye[[char]], **states)
      logits[w, t] = out["logits"][0]
      states = {n: out[n] for n in names}
  return bpc_from_logits(logits, y_ids)


def window_file_bpc(path, x_ids, y_ids, vocab):
  """bpc of a stock file (the Keras model): one window per invoke."""
  it = interpreter(path, xnnpack=False)
  (inp,), (out,) = it.get_input_details(), it.get_output_details()
  it.allocate_tensors()
  eye = np.eye(vocab, dtype=np.float32)
  logits = []
  for window in x_ids:
    # The stock LSTM op keeps its state in variable tensors across invokes;
    # each window starts from zeros, as in the Keras evaluation.
    it.reset_all_variables()
    it.set_tensor(inp["index"], eye[window][None])
    it.invoke()
    logits.append(it.get_tensor(out["index"])[0])
  return bpc_from_logits(np.stack(logits), y_ids)


def invoke_timer(path, xnnpack, steps_per_invoke):
  """ms per step of `invoke()` (inputs set once; the work does not depend
  on their values)."""
  it = interpreter(path, xnnpack)
  it.allocate_tensors()
  for detail in it.get_input_details():
    it.set_tensor(detail["index"], np.full(detail["shape"], 0.1, np.float32))
  it.invoke()

  def timer():
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
      it.invoke()
      n += 1
    return (time.perf_counter() - start) / n / steps_per_invoke * 1e3

  return timer


def stock_files(model, directory, calibration, length, vocab):
  """The stock converter's files of `model` (batch 1, `length` frames: the
  converter needs static shapes to lower the Keras LSTM)."""
  fixed = tf_keras.Sequential(
      [tf_keras.Input((length, vocab), batch_size=1)] + model.layers)
  files = {}
  for name in ("stock_float", "stock_int8"):
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    if name == "stock_int8":
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.representative_dataset = lambda: ([w[None]]
                                                  for w in calibration)
    files[name] = os.path.join(directory, name + ".tflite")
    with open(files[name], "wb") as f:
      f.write(converter.convert())
  return files


def main(argv=None):
  args = parse_args(argv)
  started = time.time()
  tf.get_logger().setLevel("ERROR")
  lm_args = char_lm.parse_args(["--quick", "--variants", args.variant,
                                "--verbose", "2"])
  if args.epochs:
    lm_args.epochs = args.epochs
  _, vocab, sets, data = char_lm.prepare_data(lm_args)
  v = len(vocab)
  (variant,) = char_lm.variants(lm_args.units, [args.variant],
                                lm_args.group_lasso, lm_args.glp_lasso)
  model, _ = char_lm.train_variant(variant, lm_args, data, v)
  keras_bpc = char_lm.bits_per_char(model, *sets[2], v)
  sparse = tfbs.to_block_sparse(model, block_size=variant.block_size,
                                min_sparsity=char_lm.SPARSE_FROM)
  eye = np.eye(v, dtype=np.float32)
  calibration = [eye[w] for w in sets[0][0][:args.calibration]]
  directory = tempfile.mkdtemp(prefix="tflite_quantized_")
  files = stock_files(model, directory, calibration, lm_args.seq_len, v)
  reports = {}
  for name in OURS:
    quantize = {"float": None, "dynamic": "dynamic"}.get(name, "int8")
    kwargs = {}
    if quantize == "int8":
      kwargs = dict(representative_dataset=[c[None] for c in calibration],
                    per_channel=name == "int8_per_channel")
    written = tfbs.export.export_tflite(
        sparse, os.path.join(directory, name), sequence_length=lm_args.seq_len,
        quantize=quantize, block_sparse=False, **kwargs)
    files[name], reports[name] = written["step"], written["report"]

  x_test, y_test = sets[2]
  rows = {}
  for name, path in files.items():
    ours = name in OURS
    bpc = (step_file_bpc(path, sparse, x_test, y_test, v) if ours
           else window_file_bpc(path, x_test, y_test, v))
    rows[name] = {"bytes": os.path.getsize(path), "test_bpc": bpc,
                  "xnnpack": reports[name]["xnnpack"] if ours else True,
                  "int8_weights": len(reports[name]["int8_weights"])
                                  if ours else None,
                  "densified": len(reports[name]["densified"]) if ours
                               else None,
                  "sparse_fully_connected": len(
                      reports[name]["sparse_fully_connected"]) if ours
                                            else None}
  timers = {}
  for name, path in files.items():
    ours = name in OURS
    per = 1 if ours else lm_args.seq_len
    timers[name + "/builtin"] = invoke_timer(path, False, per)
    if rows[name]["xnnpack"]:
      timers[name + "/xnnpack"] = invoke_timer(path, True, per)
  medians, _ = benchmarking.interleaved_medians(timers, repeats=args.repeats)
  stock_bytes = rows["stock_float"]["bytes"]
  for name, row in rows.items():
    row["ratio_to_stock_float"] = row["bytes"] / stock_bytes
    row["bpc_vs_float_sparse"] = row["test_bpc"] / rows["float"]["test_bpc"] - 1
    row["ms_per_step"] = {k.split("/")[1]: medians[k] for k in medians
                          if k.split("/")[0] == name}

  head = ("| file | bytes | vs stock float | test bpc | vs float sparse | "
          "ms/step builtin | ms/step XNNPACK |\n|---|---|---|---|---|---|---|")
  lines = [head]
  for name, r in rows.items():
    xnn = r["ms_per_step"].get("xnnpack")
    lines.append(
        f"| {name} | {r['bytes']:,} | {r['ratio_to_stock_float']:.3f}x | "
        f"{r['test_bpc']:.4f} | {100 * r['bpc_vs_float_sparse']:+.2f} % | "
        f"{r['ms_per_step']['builtin']:.4f} | "
        + (f"{xnn:.4f}" if xnn is not None else "n/a (DENSIFY int8)") + " |")
  table = "\n".join(lines)
  print("\n" + table)
  print(f"Keras model test bpc {keras_bpc:.4f}; block sparsity of the "
        f"stripped model: {char_lm.block_sparsity(model, variant.block_size):.3f}")
  os.makedirs(args.out, exist_ok=True)
  result = {"variant": args.variant, "epochs": lm_args.epochs,
            "keras_test_bpc": keras_bpc, "test_characters": int(y_test.size),
            "calibration_windows": len(calibration),
            "sequence_length": lm_args.seq_len, "rows": rows,
            "reports": reports, "seconds": time.time() - started,
            **benchmarking.machine_meta()}
  with open(os.path.join(args.out, "tflite_quantized.json"), "w") as f:
    json.dump(result, f, indent=1, default=str)
  with open(os.path.join(args.out, "tflite_quantized.md"), "w") as f:
    f.write(table + "\n")
  print(f"written to {args.out} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
  main()
