"""Runs block pruning under a tf.distribute strategy in a fresh process.

Used by test_distributed.py: logical devices and TF_CONFIG must be set
before TensorFlow initialises, so each scenario runs here, in its own
process, and writes what it measured to `<out>.npz` for the test to check
against numpy references. Usage:

    python -m tests.pruning.distributed_worker mirrored OUT_DIR
    python -m tests.pruning.distributed_worker multi_worker OUT_DIR INDEX
"""

import os
import sys
import time

import numpy as np

MODE = sys.argv[1]
OUT = sys.argv[2]

import tensorflow as tf  # pylint: disable=g-import-not-at-top

if MODE == "mirrored":
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices("CPU")[0],
      [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_keras  # pylint: disable=g-import-not-at-top

import tf_blocksparse as tfbs  # pylint: disable=g-import-not-at-top

L = tf_keras.layers
BS = (2, 2)
IN_SHAPE = (3, 4)
GLOBAL_BATCH = 4


def schedules():
  """GRU: the paper's threshold; LSTM and Dense: sparsity targets."""
  return (tfbs.schedules.GradualThreshold(start_step=1, ramp_step=3,
                                          end_step=7, frequency=2),
          tfbs.schedules.PolynomialDecay(0.0, 0.75, begin_step=1, end_step=7,
                                         frequency=2))


def build(lr, group_lasso=0.0):
  """A tiny GRU -> LSTM -> Dense model; initial weights from seed 0."""
  threshold, poly = schedules()
  inp = tf_keras.Input(IN_SHAPE)
  x = tfbs.prune_block_low_magnitude(
      L.GRU(4, return_sequences=True), block_size=BS,
      pruning_schedule=threshold, block_pooling="max")(inp)
  x = tfbs.prune_block_low_magnitude(L.LSTM(6), block_size=BS,
                                     pruning_schedule=poly,
                                     group_lasso=group_lasso)(x)
  out = tfbs.prune_block_low_magnitude(L.Dense(2), block_size=BS,
                                       pruning_schedule=poly)(x)
  model = tf_keras.Model(inp, out)
  rng = np.random.RandomState(0)
  model.set_weights([rng.uniform(-1, 1, w.shape).astype(w.dtype.as_numpy_dtype)
                     if w.trainable else w.numpy() for w in model.weights])
  model.compile(tf_keras.optimizers.SGD(lr), "mse")
  return model


def build_small(lr, group_lasso=0.0):
  """LSTM -> Dense, both on the sparsity schedule (cheap to trace)."""
  _, poly = schedules()
  inp = tf_keras.Input(IN_SHAPE)
  x = tfbs.prune_block_low_magnitude(L.LSTM(6), block_size=BS,
                                     pruning_schedule=poly,
                                     group_lasso=group_lasso)(inp)
  out = tfbs.prune_block_low_magnitude(L.Dense(2), block_size=BS,
                                       pruning_schedule=poly)(x)
  model = tf_keras.Model(inp, out)
  rng = np.random.RandomState(1)
  model.set_weights([rng.uniform(-1, 1, w.shape).astype(np.float32)
                     if w.trainable else w.numpy() for w in model.weights])
  model.compile(tf_keras.optimizers.SGD(lr), "mse")
  return model


def data(steps, seed):
  rng = np.random.RandomState(seed)
  x = rng.randn(steps * GLOBAL_BATCH, *IN_SHAPE).astype(np.float32)
  y = rng.randn(steps * GLOBAL_BATCH, 2).astype(np.float32)
  return x, y


def fit(model, steps, seed):
  x, y = data(steps, seed)
  return model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False,
                   verbose=0, callbacks=[tfbs.UpdatePruningStep()])


def wrappers(model):
  return [l for l in model.layers
          if isinstance(l, tfbs.pruning.PruneBlockLowMagnitude)]


def copies(var):
  """Numpy values of every local copy of a (maybe mirrored) variable."""
  values = getattr(var, "values", None) or (var,)
  return np.stack([v.numpy() for v in values])


def state(model, prefix, out):
  """Every copy of step, masks, thresholds, q and weights, by name."""
  for layer in wrappers(model):
    out[f"{prefix}/{layer.name}/step"] = copies(layer.pruning_step)
    for mw in layer.masked_weights:
      key = f"{prefix}/{layer.name}/{mw.path}"
      out[key + "/mask"] = copies(mw.mask)
      out[key + "/weight"] = copies(mw.weight)
      out[key + "/threshold"] = copies(mw.threshold)
      out[key + "/q"] = copies(mw.q)
      out[key + "/gates"] = np.array(mw.gates)


def custom_loop(strategy, model, steps, out):
  """`strategy.run` in a `tf.function`, without fit or callbacks."""
  for layer in wrappers(model):
    layer.pruning_step.assign(0)   # what UpdatePruningStep does
  optimizer = tf_keras.optimizers.SGD(0.05)
  x, y = data(steps, seed=3)
  dataset = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH))

  @tf.function
  def train_step(batch):
    def replica_step(xb, yb):
      with tf.GradientTape() as tape:
        loss = tf.nn.compute_average_loss(
            tf.reduce_mean(tf.square(model(xb, training=True) - yb), -1),
            global_batch_size=GLOBAL_BATCH)
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
    strategy.run(replica_step, args=batch)

  for batch in dataset:
    train_step(batch)
  state(model, "loop", out)


def log(what, t0=time.time()):
  print(f"[{time.time() - t0:6.1f} s] {what}", flush=True)


def mirrored():
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  out = {"replicas": np.array(strategy.num_replicas_in_sync)}
  with strategy.scope():
    model = build(lr=0.0)
  out["init"] = np.concatenate([copies(w)[0].ravel()
                                for w in model.trainable_weights])
  for layer in wrappers(model):
    for mw in layer.masked_weights:
      out[f"w0/{layer.name}/{mw.path}"] = copies(mw.weight)[0]
  fit(model, 4, seed=0)            # lr 0: masks from the initial weights
  state(model, "phase1", out)
  log('state(model, "phase1", out)')
  model.optimizer.learning_rate.assign(0.05)
  fit(model, 4, seed=1)            # steps 5..8: updates at 5 and 7
  state(model, "phase2", out)
  log('state(model, "phase2", out)')

  loaded = {}
  for fmt in ("keras", "h5", "tf"):
    path = os.path.join(OUT, {"keras": "m.keras", "h5": "m.h5",
                              "tf": "saved"}[fmt])
    model.save(path)
    with strategy.scope():
      loaded[fmt] = tf_keras.models.load_model(path)
    state(loaded[fmt], f"loaded_{fmt}", out)
    log(f"saved and loaded {fmt}")
  fit(model, 2, seed=2)            # resume both on the same batches
  fit(loaded["keras"], 2, seed=2)
  state(model, "resumed_original", out)
  state(loaded["keras"], "resumed_loaded", out)

  with strategy.scope():
    looped = build_small(lr=0.05)
  custom_loop(strategy, looped, 3, out)
  log('custom_loop(strategy, looped, 3, out)')

  # Group lasso: with lr 0 the reported loss is mse + λ·Σ‖block‖₂.
  with strategy.scope():
    glp = build_small(lr=0.0, group_lasso=0.5)
  x, y = data(1, seed=4)
  out["glp_loss"] = np.array(fit(glp, 1, seed=4).history["loss"][0])
  out["glp_pred"] = glp.predict(x, verbose=0)
  out["glp_y"] = y
  lstm = wrappers(glp)[0]
  for mw in lstm.masked_weights:
    out[f"glp/{mw.path}"] = copies(mw.weight)[0] * copies(mw.mask)[0]
  np.savez(os.path.join(OUT, "mirrored.npz"), **out)


def multi_worker(index):
  strategy = tf.distribute.MultiWorkerMirroredStrategy()
  out = {"replicas": np.array(strategy.num_replicas_in_sync)}
  with strategy.scope():
    model = build_small(lr=0.05)
  fit(model, 8, seed=0)            # the global batch is split over workers
  state(model, "trained", out)
  log('state(model, "trained", out)')
  # Each worker writes its own copy (non-chief workers too, or they hang).
  path = os.path.join(OUT, f"worker{index}.keras")
  model.save(path)
  with strategy.scope():
    loaded = tf_keras.models.load_model(path)
  state(loaded, "loaded", out)
  log('state(loaded, "loaded", out)')
  np.savez(os.path.join(OUT, f"worker{index}.npz"), **out)


if __name__ == "__main__":
  if MODE == "mirrored":
    mirrored()
  else:
    multi_worker(int(sys.argv[3]))
