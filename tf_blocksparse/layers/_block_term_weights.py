"""Creation of block-term factor/core variables on a Keras layer.

Shared by `BlockTermDense` and the block-term RNN cells, so that both use
the same variable names, shapes and default initialisation.
"""

import tf_keras

from tf_blocksparse.block_term import decomposition


def fresh_initializer(initializer):
  """A new instance of `initializer`: tf_keras warns (and repeats values)
  when one unseeded instance initialises several variables."""
  initializer = tf_keras.initializers.get(initializer)
  if isinstance(initializer, tf_keras.initializers.Initializer):
    return initializer.__class__.from_config(initializer.get_config())
  return initializer


def add_block_term_weights(layer, input_modes, output_modes, ranks, num_blocks,
                           factor_initializer=None, core_initializer=None,
                           factor_regularizer=None, core_regularizer=None):
  """Adds `factor_0..factor_{d-1}` and `core` to `layer`.

  `None` initialisers mean the Glorot-matched normal scheme of
  `decomposition.glorot_stddevs`: the reconstructed `W` then has the
  variance `2 / (I + J)` that `glorot_uniform` gives a dense `[I, J]`
  kernel.

  Returns:
    `(factors, core)`: a list of `d` variables `[N, I_k, J_k, R_k]` and a
    variable `[N, R_1, ..., R_d]`.
  """
  factor_stds, core_std = decomposition.glorot_stddevs(
      input_modes, output_modes, ranks, num_blocks)
  factors = []
  for k, (i, j, r) in enumerate(zip(input_modes, output_modes, ranks)):
    init = (tf_keras.initializers.RandomNormal(stddev=factor_stds[k])
            if factor_initializer is None else fresh_initializer(factor_initializer))
    factors.append(layer.add_weight(
        name=f"factor_{k}", shape=[num_blocks, i, j, r], initializer=init,
        regularizer=factor_regularizer, trainable=True))
  init = (tf_keras.initializers.RandomNormal(stddev=core_std)
          if core_initializer is None else fresh_initializer(core_initializer))
  core = layer.add_weight(
      name="core", shape=[num_blocks] + list(ranks), initializer=init,
      regularizer=core_regularizer, trainable=True)
  return factors, core


def serialize_optional(serialize, value):
  return None if value is None else serialize(value)


def set_factor_core_args(layer, factor_initializer, core_initializer,
                         factor_regularizer, core_regularizer):
  """Stores the factor/core initialisers and regularisers on `layer`, as
  `BlockTermDense` and the block-term cells take them (a `None` initialiser
  keeps the Glorot-matched default of `add_block_term_weights`)."""
  layer.factor_initializer = (None if factor_initializer is None else
                              tf_keras.initializers.get(factor_initializer))
  layer.core_initializer = (None if core_initializer is None else
                            tf_keras.initializers.get(core_initializer))
  layer.factor_regularizer = tf_keras.regularizers.get(factor_regularizer)
  layer.core_regularizer = tf_keras.regularizers.get(core_regularizer)


def factor_core_config(layer):
  """The config entries of what `set_factor_core_args` stored."""
  return {
      "factor_initializer": serialize_optional(
          tf_keras.initializers.serialize, layer.factor_initializer),
      "core_initializer": serialize_optional(
          tf_keras.initializers.serialize, layer.core_initializer),
      "factor_regularizer": serialize_optional(
          tf_keras.regularizers.serialize, layer.factor_regularizer),
      "core_regularizer": serialize_optional(
          tf_keras.regularizers.serialize, layer.core_regularizer),
  }
