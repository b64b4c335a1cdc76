"""Exports a block-sparse LSTM model as a SavedModel for TF Serving.

Builds a 90 % block-pruned LSTM(128) + Dense model (pruned here by zeroing
the (4, 4) blocks of smallest magnitude; in a real project:
`tfbs.prune_block_low_magnitude`, fine-tuning, `tfbs.strip_block_pruning`),
converts it with `tfbs.to_block_sparse`, writes both export modes, compares
the size of the variables with the dense export, and runs the
`serving_default` and streaming `step` signatures of the portable export the
way a server would (plain TensorFlow, no tf_blocksparse code involved).

Run: python examples/export_serving.py   (CPU, about 20 s)

Then, e.g.:
  saved_model_cli show --all --dir <printed portable path>
  docker run -p 8501:8501 -v <portable path>:/models/lstm/1 \\
      -e MODEL_NAME=lstm tensorflow/serving
"""

import os
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs

FEATURES, UNITS, OUTPUTS, BLOCK, SPARSITY = 64, 128, 32, (4, 4), 0.9


def prune_blocks(w, block, sparsity):
  """Zeroes the `sparsity` fraction of `block` blocks of smallest L2 norm."""
  (k, n), (bh, bw) = w.shape, block
  norms = np.sqrt((w.reshape(k // bh, bh, n // bw, bw) ** 2).sum(axis=(1, 3)))
  keep = norms > np.quantile(norms, sparsity)
  return w * np.kron(keep, np.ones(block, w.dtype))


def folder_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def main():
  tf_keras.utils.set_random_seed(0)
  dense = tf_keras.Sequential([
      tf_keras.Input((None, FEATURES), name="frames"),
      tf_keras.layers.LSTM(UNITS, return_sequences=True, name="lstm"),
      tf_keras.layers.Dense(OUTPUTS, name="logits")])
  for layer in dense.layers:
    layer.set_weights([prune_blocks(w, BLOCK, SPARSITY) if w.ndim == 2 else w
                       for w in layer.get_weights()])
  sparse = tfbs.to_block_sparse(dense, block_size=BLOCK)

  out = tempfile.mkdtemp()
  paths = {name: os.path.join(out, name) for name in ("portable", "custom_op", "dense")}
  tfbs.export.export_saved_model(sparse, paths["portable"])
  tfbs.export.export_saved_model(sparse, paths["custom_op"], mode="custom_op")
  tfbs.export.export_saved_model(dense, paths["dense"], block_sparse=False)
  sizes = {k: folder_bytes(os.path.join(p, "variables")) for k, p in paths.items()}
  print(f"variables: sparse {sizes['portable'] / 1e3:.1f} kB, dense "
        f"{sizes['dense'] / 1e3:.1f} kB ({sizes['portable'] / sizes['dense']:.3f} x)")

  # What a server does: plain TensorFlow loads the portable export.
  loaded = tf.saved_model.load(paths["portable"])
  x = np.random.RandomState(0).randn(2, 20, FEATURES).astype(np.float32)
  served = loaded.signatures["serving_default"](frames=tf.constant(x))["logits"]
  print("serving_default max |served - Keras|:",
        float(np.abs(served.numpy() - dense(x).numpy()).max()))

  # Streaming: feed one frame at a time and carry the states.
  step = loaded.signatures["step"]
  states = {"lstm_h": tf.zeros([2, UNITS]), "lstm_c": tf.zeros([2, UNITS])}
  frames = []
  for t in range(x.shape[1]):
    result = step(frames=tf.constant(x[:, t]), **states)
    frames.append(result["logits"].numpy())
    states = {n: result[n] for n in states}
  print("step signature max |streamed - Keras|:",
        float(np.abs(np.stack(frames, 1) - dense(x).numpy()).max()))

  # The custom-op export needs the ops registered first.
  fused = tfbs.export.load_saved_model(paths["custom_op"])
  fused_out = fused.signatures["serving_default"](frames=tf.constant(x))["logits"]
  print("custom_op export max |fused - Keras|:",
        float(np.abs(fused_out.numpy() - dense(x).numpy()).max()))
  print("exports in", out, "; inspect with: saved_model_cli show --all --dir",
        paths["portable"])


if __name__ == "__main__":
  main()
