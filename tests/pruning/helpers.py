"""Small model-building helpers shared by the pruning tests."""

import numpy as np
import tf_keras

import tf_blocksparse as tfbs


def fit_steps(model, steps, batch=2, seed=0, callbacks=None):
  """Runs exactly `steps` training steps of `model.fit` on random data."""
  rng = np.random.RandomState(seed)
  in_shape = model.input_shape[1:]
  out_shape = model.output_shape[1:]
  x = rng.randn(steps * batch, *in_shape).astype(np.float32)
  y = rng.randn(steps * batch, *out_shape).astype(np.float32)
  if callbacks is None:
    callbacks = [tfbs.UpdatePruningStep()]
  return model.fit(x, y, batch_size=batch, epochs=1, shuffle=False,
                   verbose=0, callbacks=callbacks)


def sgd(lr):
  return tf_keras.optimizers.SGD(learning_rate=lr)


def set_lr(model, lr):
  model.optimizer.learning_rate.assign(lr)
