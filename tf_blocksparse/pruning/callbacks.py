"""Training callbacks: stepping the pruning wrappers and logging sparsity.

tfmot's own callbacks already drive our wrappers (they subclass tfmot's
`PruneLowMagnitude`). `UpdatePruningStep` extends tfmot's with a final
re-mask when training ends; `PruningSummaries` writes block-level scalars.
"""

import os

import numpy as np
import tensorflow as tf
import tf_keras
from tensorflow.core.framework import summary_pb2
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_callbacks as tfmot_callbacks)

from tf_blocksparse.pruning import wrapper as wrapper_lib


class UpdatePruningStep(tfmot_callbacks.UpdatePruningStep):
  """Advances the pruning step of every wrapper; required while training.

  On the first training of a fresh model it sets the wrappers' step to 0
  (a restored model keeps its step, so its schedule resumes where it was);
  at each epoch end and when training ends it writes `weight * mask` into
  the weights, so saved and stripped models hold exact zeros.

  Example:

  >>> import tf_blocksparse as tfbs
  >>> callbacks = [tfbs.UpdatePruningStep()]
  """

  def on_train_end(self, logs=None):
    self.on_epoch_end(-1, logs)


class PruningSummaries(tf_keras.callbacks.Callback):
  """Writes per-weight sparsity and threshold for TensorBoard.

  At the start of each epoch and at the end of training it writes, for each
  pruned weight `<layer>/<path>`: `.../block_sparsity` (fraction of blocks
  pruned), `.../element_sparsity` and `.../threshold` (ε in threshold mode,
  the weakest kept block's representative in sparsity mode), plus tfmot's
  tags `<mask name>/sparsity` and `<threshold name>/threshold`, at the
  optimizer's step, under `<log_dir>/metrics` (tfmot's layout).

  Unlike tfmot's callback it is not a `TensorBoard` callback (add
  `tf_keras.callbacks.TensorBoard` for losses and metrics) and it writes
  with `tf.summary.write`, so it works without the tensorboard package
  installed (which is only needed to view the logs).

  Example:

  >>> import tempfile, tf_blocksparse as tfbs
  >>> cb = tfbs.PruningSummaries(log_dir=tempfile.mkdtemp())
  """

  def __init__(self, log_dir):
    super().__init__()
    if not isinstance(log_dir, str) or not log_dir:
      raise ValueError(f"log_dir must be a non-empty string (a directory "
                       f"for the event files), got {log_dir!r}.")
    self.log_dir = log_dir
    self._writer = None

  def _write(self):
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(
          os.path.join(self.log_dir, "metrics"))
    step = int(tf_keras.backend.get_value(self.model.optimizer.iterations))
    with self._writer.as_default():
      for name, value in block_scalars(self.model).items():
        tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                         metadata=_SCALAR_METADATA)
    self._writer.flush()

  def on_epoch_begin(self, epoch, logs=None):
    self._write()

  def on_train_end(self, logs=None):
    self._write()


# What tensorboard's own scalar summaries carry, so it plots these.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR)


def block_scalars(model):
  """`{name: value}` of block sparsity, element sparsity and threshold."""
  scalars = {}
  for layer in wrapper_lib.collect_block_pruning_layers(model):
    if not layer.built:
      continue
    for mw in layer.masked_weights:
      prefix = f"{layer.name}/{mw.path}"
      blocks = layer.pruning_obj.block_mask(mw).numpy()
      scalars[f"{prefix}/block_sparsity"] = float(1.0 - np.mean(blocks))
      scalars[f"{prefix}/element_sparsity"] = float(
          1.0 - np.mean(mw.mask.numpy()))
      scalars[f"{prefix}/threshold"] = float(mw.threshold.numpy())
      # tfmot's PruningSummaries tags, for the same dashboards.
      scalars[f"{mw.mask.name}/sparsity"] = scalars[
          f"{prefix}/element_sparsity"]
      scalars[f"{mw.threshold.name}/threshold"] = scalars[
          f"{prefix}/threshold"]
  return scalars
