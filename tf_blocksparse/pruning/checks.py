"""Small input checks shared by the pruning API."""

import numbers

import tensorflow as tf


def is_keras3(obj):
  """True for objects of Keras 3 (the `keras` package), which tfmot and
  this package do not support."""
  for cls in type(obj).__mro__:
    module = getattr(cls, "__module__", "") or ""
    if module == "keras" or module.startswith("keras."):
      return True
  return False


def reject_keras3(obj):
  if is_keras3(obj):
    raise TypeError(
        f"{type(obj).__name__} is a Keras 3 object (`import keras`). "
        f"tf_blocksparse, like tensorflow-model-optimization, works with "
        f"Keras 2: build the model with `import tf_keras` (e.g. "
        f"tf_keras.Sequential, tf_keras.layers.LSTM) instead.")


def non_negative(name, value):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
  if not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}.")
  return float(value)


def smart_cond(pred, true_fn, false_fn):
  """`tf.cond` that branches in Python when `pred` is a Python value."""
  if isinstance(pred, tf.Variable):
    pred = tf.convert_to_tensor(pred)
  if tf.is_tensor(pred):
    static = tf.get_static_value(pred)
    if static is None:
      return tf.cond(tf.cast(pred, tf.bool), true_fn, false_fn)
    pred = static
  return true_fn() if bool(pred) else false_fn()
