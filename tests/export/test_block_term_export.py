"""Block-term layers export through `export_saved_model(mode="portable")`."""

import numpy as np
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tests.export.test_saved_model import _graph_op_types


def test_block_term_model_exports_portable_with_stock_ops_only(tmp_path):
  model = tf_keras.Sequential([
      tf_keras.Input((5, 24)),
      tfbs.layers.BlockTermLSTM(8, input_modes=(4, 6), rank=2, num_blocks=2,
                                recurrent_block_size=4, recurrent_density=0.5,
                                return_sequences=True),
      tfbs.layers.BlockTermDense((2, 4), (3, 2), rank=2, num_blocks=1),
  ])
  path = str(tmp_path / "bt")
  tfbs.export.export_saved_model(model, path, step_signature=False)
  assert not [t for t in _graph_op_types(path) if t.lower().startswith("tfbs")]
  x = np.random.RandomState(0).randn(3, 5, 24).astype(np.float32)
  loaded = tf.saved_model.load(path)
  signature = loaded.signatures["serving_default"]
  (out,) = signature(**{model.input_names[0]: tf.constant(x)}).values()
  np.testing.assert_allclose(out.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
