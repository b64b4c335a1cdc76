"""Exports a 90 % block-sparse LSTM model to TFLite and runs it in LiteRT.

The model is the issue's example size (LSTM(256) + Dense(256) on 256
features). Its weights are block pruned here by zeroing the (4, 1) blocks of
smallest magnitude (in a real project: `tfbs.prune_block_low_magnitude`,
fine-tuning, then `tfbs.strip_block_pruning`), converted with
`tfbs.to_block_sparse`, and exported with `tfbs.export.export_tflite`. The
script prints the sparsity report, the file sizes against the stock
converter's file of the dense model, the error against Keras over a 50-step
sequence, and the LiteRT latency per step.

Run: python examples/export_tflite.py   (CPU, about 30 s; needs ai-edge-litert)
"""

import os
import tempfile
import time

import numpy as np
import tensorflow as tf
import tf_keras
from ai_edge_litert.interpreter import Interpreter

import tf_blocksparse as tfbs

FEATURES, UNITS, OUTPUTS, STEPS = 256, 256, 256, 50
BLOCK, SPARSITY = (4, 1), 0.9


def prune_blocks(w, block, sparsity):
  """Zeroes the `sparsity` fraction of `block` blocks of smallest L2 norm."""
  (k, n), (bh, bw) = w.shape, block
  norms = np.sqrt((w.reshape(k // bh, bh, n // bw, bw) ** 2).sum(axis=(1, 3)))
  keep = norms > np.quantile(norms, sparsity)
  return w * np.kron(keep, np.ones(block, w.dtype))


def build_pruned_model():
  tf_keras.utils.set_random_seed(0)
  model = tf_keras.Sequential([
      tf_keras.Input((None, FEATURES), name="frames"),
      tf_keras.layers.LSTM(UNITS, return_sequences=True, name="lstm"),
      tf_keras.layers.Dense(OUTPUTS, name="logits")])
  for layer in model.layers:
    layer.set_weights([prune_blocks(w, BLOCK, SPARSITY) if w.ndim == 2 else w
                       for w in layer.get_weights()])
  return model


def invoke_latency_us(path_or_content, repeats, x=None):
  """Mean time of `invoke()` alone on one thread, inputs set once."""
  source = ({"model_path": path_or_content}
            if isinstance(path_or_content, str)
            else {"model_content": path_or_content})
  interpreter = Interpreter(num_threads=1, **source)
  interpreter.allocate_tensors()
  for detail in interpreter.get_input_details():
    value = x if x is not None and detail["shape"].tolist() == list(x.shape) \
        else np.full(detail["shape"], 0.1, np.float32)
    interpreter.set_tensor(detail["index"], value)
  interpreter.invoke()
  start = time.perf_counter()
  for _ in range(repeats):
    interpreter.invoke()
  return (time.perf_counter() - start) / repeats * 1e6


def main():
  dense = build_pruned_model()
  sparse = tfbs.to_block_sparse(dense, block_size=BLOCK)
  out_dir = tempfile.mkdtemp()
  files = tfbs.export.export_tflite(sparse, os.path.join(out_dir, "lstm"),
                                    sequence_length=STEPS)
  report = files["report"]
  print("stored sparse:", [(t["name"], t["shape"]) for t in report["sparse_tensors"]])
  print("FULLY_CONNECTED on sparse weights (sparse kernel):",
        len(report["sparse_fully_connected"]),
        "| densified:", report["densified"],
        "| on dense weights:", report["dense_fully_connected"])

  stock_model = tf_keras.Sequential(
      [tf_keras.Input((STEPS, FEATURES), batch_size=1)] + dense.layers)
  stock = tf.lite.TFLiteConverter.from_keras_model(stock_model).convert()
  for kind in ("step", "sequence"):
    size = os.path.getsize(files[kind])
    print(f"{kind} model: {size / 1e6:.3f} MB = {size / len(stock):.3f} x the "
          f"stock converter's dense file ({len(stock) / 1e6:.3f} MB)")

  x = np.random.RandomState(0).randn(1, STEPS, FEATURES).astype(np.float32)
  expected = dense(x).numpy()
  sequence = Interpreter(model_path=files["sequence"], num_threads=1)
  got = np.array(sequence.get_signature_runner("sequence")(frames=x)["logits"])
  step = Interpreter(model_path=files["step"], num_threads=1)
  runner = step.get_signature_runner("step")
  states = {n: np.zeros([1, UNITS], np.float32)
            for n in tfbs.export.state_names(sparse)}
  outputs = []
  for t in range(STEPS):
    result = runner(frames=x[:, t], **states)
    # Copies: LiteRT's outputs are views of its buffers.
    outputs.append(np.array(result["logits"]))
    states = {n: np.array(result[n]) for n in states}
  del result
  print(f"max |LiteRT - Keras| over {STEPS} steps: sequence model "
        f"{np.abs(got - expected).max():.2e}, step model "
        f"{np.abs(np.stack(outputs, 1) - expected).max():.2e}")

  # Latency, one thread: the step model's invoke vs the stock converter's
  # dense sequence model (UNIDIRECTIONAL_SEQUENCE_LSTM) per step.
  step_us = invoke_latency_us(files["step"], 2000)
  dense_files = tfbs.export.export_tflite(
      dense, os.path.join(out_dir, "dense"), sequence_length=STEPS,
      sparsity=False, block_sparse=False)
  dense_step_us = invoke_latency_us(dense_files["step"], 2000)
  stock_us = invoke_latency_us(stock, 100, x) / STEPS
  sequence_us = invoke_latency_us(files["sequence"], 100, x) / STEPS
  print(f"LiteRT latency per step (1 thread): sparse step model {step_us:.1f} us, "
        f"dense step model {dense_step_us:.1f} us, stock dense LSTM "
        f"{stock_us:.1f} us, sparse unrolled sequence {sequence_us:.1f} us")


if __name__ == "__main__":
  main()
