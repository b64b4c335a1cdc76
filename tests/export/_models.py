"""Small models, and edits of their exports, shared by the export tests."""

import os

import numpy as np
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs


def zero_blocks(w, block_size, sparsity, seed):
  """`w` with a random `sparsity` fraction of its blocks set to zero."""
  (k, n), (bh, bw) = w.shape, block_size
  rng = np.random.RandomState(seed)
  nbr, nbc = -(-k // bh), -(-n // bw)
  keep = np.zeros(nbr * nbc, bool)
  keep[rng.choice(nbr * nbc, int(round((1 - sparsity) * nbr * nbc)),
                  replace=False)] = True
  mask = np.kron(keep.reshape(nbr, nbc), np.ones([bh, bw]))[:k, :n]
  return (w * mask).astype(w.dtype)


def pruned_dense_model(rnn="lstm", features=8, units=16, outputs=3,
                       sparsity=0.9, block_size=(4, 4), return_sequences=False,
                       seed=0):
  """A tf_keras RNN + Dense model with block-pruned (zeroed) matrices."""
  cls = {"lstm": tf_keras.layers.LSTM, "gru": tf_keras.layers.GRU,
         "simple": tf_keras.layers.SimpleRNN}[rnn]
  tf_keras.utils.set_random_seed(seed)
  model = tf_keras.Sequential([
      tf_keras.Input((None, features), name="frames"),
      cls(units, return_sequences=return_sequences, name="rnn"),
      tf_keras.layers.Dense(outputs, name="logits"),
  ])
  for i, layer in enumerate(model.layers):
    weights = layer.get_weights()
    pruned = [zero_blocks(w, block_size, sparsity, seed + 10 * i + j)
              if w.ndim == 2 else w + 0.1 for j, w in enumerate(weights)]
    layer.set_weights(pruned)
  return model


def block_sparse_model(rnn="lstm", block_size=(4, 4), **kwargs):
  """`pruned_dense_model` converted to tf_blocksparse layers, and it."""
  dense = pruned_dense_model(rnn, block_size=block_size, **kwargs)
  return tfbs.to_block_sparse(dense, block_size=block_size), dense


def streaming_model(seed=0):
  """Block-sparse LSTM -> GRU (sequences) -> Dense, for step tests."""
  tf_keras.utils.set_random_seed(seed)
  return tf_keras.Sequential([
      tf_keras.Input((None, 6), name="frames"),
      tfbs.layers.BlockSparseLSTM(8, block_size=(4, 4), density=0.5,
                                  return_sequences=True, name="lstm",
                                  bias_initializer="random_normal"),
      tfbs.layers.BlockSparseGRU(8, block_size=(4, 2), density=0.5,
                                 return_sequences=True, name="gru",
                                 bias_initializer="random_normal"),
      tf_keras.layers.Dense(3, name="logits"),
  ])


def rewrite_checkpoint(path, match, tamper):
  """Rewrites the export's variables with valid checksums, `tamper`ing the
  int32 tensor equal to `match`, as a deliberate edit of the files would."""
  prefix = os.path.join(path, "variables", "variables")
  reader = tf.train.load_checkpoint(prefix)
  names, tensors, hits = [], [], 0
  for name in sorted(reader.get_variable_to_shape_map()):
    value = reader.get_tensor(name)
    if (isinstance(value, np.ndarray) and value.dtype == np.int32
        and value.shape == match.shape and np.array_equal(value, match)):
      value, hits = tamper(value), hits + 1
    names.append(name)
    tensors.append(tf.constant(value))
  assert hits == 1
  for f in os.listdir(os.path.dirname(prefix)):
    os.remove(os.path.join(os.path.dirname(prefix), f))
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                    shape_and_slices=[""] * len(names), tensors=tensors)
