"""Portable SavedModel directory: block-sparse char-LM vs the dense one.

The char-LM's shape (one-hot characters -> LSTM(units) -> Dense logits,
vocabulary 98) with random 4 x 4 block masks at `--density` on the LSTM's
input and recurrent kernels, and on the logits layer too (`--prune-output
1`, the default) or not (`0`). Both models are exported with
`tfbs.export.export_saved_model` (portable mode; the dense one stays
dense), reloaded, checked against the Keras model, and the whole
directories compared (saved_model.pb, variables, fingerprint). Sizes do
not depend on the machine; no time is measured. Writes a table to stdout
and `savedmodel_size.json` to `--out` (default benchmarks/results/).

    python benchmarks/savedmodel_size.py                 # ~1 min
    python benchmarks/savedmodel_size.py --units 128 --prune-output 0
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import tf_blocksparse as tfbs  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_blocksparse import benchmarking  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = 98


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--units", default="128,256", help="comma-separated")
  p.add_argument("--density", type=float, default=0.1, help="kept blocks")
  p.add_argument("--prune-output", default="1,0", help="comma-separated 0/1")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  return p.parse_args(argv)


def char_lm(units):
  return tf_keras.Sequential([
      tf_keras.Input((None, VOCAB), name="chars"),
      tf_keras.layers.LSTM(units, return_sequences=True, name="rnn"),
      tf_keras.layers.Dense(VOCAB, name="logits")])


def block_mask(shape, density, rng, block=4):
  grid = (-(-shape[0] // block), -(-shape[1] // block))
  kept = (rng.rand(*grid) < density).astype(np.float32)
  return np.kron(kept, np.ones((block, block), np.float32))[:shape[0], :shape[1]]


def directory_bytes(path):
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def measure(units, density, prune_output, scratch):
  rng = np.random.RandomState(0)
  dense = char_lm(units)
  weights = dense.get_weights()   # kernel, recurrent, bias, logits W, b
  pruned = [0, 1, 3] if prune_output else [0, 1]
  for i in pruned:
    weights[i] = weights[i] * block_mask(weights[i].shape, density, rng)
  sparse = char_lm(units)
  sparse.set_weights(weights)
  converted = tfbs.to_block_sparse(sparse, block_size=(4, 4))
  paths = {}
  for name, model, block_sparse in (("dense", dense, False),
                                    ("sparse", converted, "auto")):
    paths[name] = os.path.join(scratch, f"{units}_{prune_output}_{name}")
    tfbs.export.export_saved_model(model, paths[name], block_sparse=block_sparse)
    x = tf.one_hot(rng.randint(0, VOCAB, (2, 7)), VOCAB)
    got = tf.saved_model.load(paths[name]).signatures["serving_default"](chars=x)
    np.testing.assert_allclose(next(iter(got.values())).numpy(),
                               model(x).numpy(), rtol=1e-4, atol=1e-5)
  row = {"units": units, "density": density, "prune_output": bool(prune_output)}
  for name, path in paths.items():
    row[f"{name}_dir_bytes"] = directory_bytes(path)
    row[f"{name}_pb_bytes"] = os.path.getsize(os.path.join(path, "saved_model.pb"))
    row[f"{name}_variables_bytes"] = directory_bytes(os.path.join(path, "variables"))
  row["dir_ratio"] = row["sparse_dir_bytes"] / row["dense_dir_bytes"]
  return row


def main(argv=None):
  args = parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for units in (int(u) for u in args.units.split(",")):
      for prune_output in (int(p) for p in args.prune_output.split(",")):
        rows.append(measure(units, args.density, prune_output, scratch))
  print("| LSTM | logits pruned | dense dir (pb) | sparse dir (pb, variables) "
        "| ratio |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['units']} | {'yes' if r['prune_output'] else 'no'} | "
          f"{r['dense_dir_bytes']:,} ({r['dense_pb_bytes']:,}) | "
          f"{r['sparse_dir_bytes']:,} ({r['sparse_pb_bytes']:,}, "
          f"{r['sparse_variables_bytes']:,}) | {r['dir_ratio']:.3f}x |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "savedmodel_size.json"), "w") as f:
    json.dump({"tensorflow": tf.__version__, "machine": benchmarking.cpu_info(),
               "note": "sizes do not depend on the machine", "rows": rows},
              f, indent=1)


if __name__ == "__main__":
  main()
