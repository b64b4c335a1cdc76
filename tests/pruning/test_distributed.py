"""Block pruning under tf.distribute strategies, on CPU.

MirroredStrategy with 2 logical devices and MultiWorkerMirroredStrategy
with 2 worker processes on 127.0.0.1 run in subprocesses
(`distributed_worker.py`), since devices and TF_CONFIG must be set before
TensorFlow starts; single-device strategies run here. Every copy of every
pruning variable is compared: masks, steps and weights must be identical on
all replicas and workers, and match numpy references.
"""

import glob
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tests.pruning import helpers
from tests.pruning import np_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BS = (2, 2)
TIMEOUT_S = 300


def _run_workers(args_list, out_dir, envs):
  """Starts one worker process per args, waits (bounded), returns logs."""
  procs = []
  for args, env in zip(args_list, envs):
    log = open(os.path.join(out_dir, f"log{len(procs)}.txt"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "tests.pruning.distributed_worker", *args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  try:
    for proc, _ in procs:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  logs = [open(log.name).read() for _, log in procs]
  for (proc, _), text in zip(procs, logs):
    assert proc.returncode == 0, text[-4000:]
  return logs


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
             CUDA_VISIBLE_DEVICES="")
  env.update(extra)
  return env


def _layers(d, prefix):
  return sorted({k.split("/")[1] for k in d.files
                 if k.startswith(prefix + "/")})


def _weights(d, prefix, layer):
  return sorted({k.split("/")[2] for k in d.files
                 if k.startswith(f"{prefix}/{layer}/") and
                 not k.endswith("/step")})


def _assert_copies_identical(d, prefix):
  """Every replica holds the same step, masks, thresholds and weights."""
  for key in d.files:
    if key.startswith(prefix + "/") and not key.endswith("/gates"):
      copies = d[key]
      assert len(copies) >= 1
      for c in copies[1:]:
        np.testing.assert_array_equal(c, copies[0], err_msg=key)


def _sparsity_ok(mask, gates, target):
  blocks = np_blocks.block_mask_of_values(mask, BS, gates)
  return abs((1 - blocks.mean()) - target) <= 1.0 / blocks.size + 1e-9


def _poly(step):
  poly = tfbs.schedules.PolynomialDecay(0.0, 0.75, begin_step=1, end_step=7,
                                        frequency=2)
  return float(poly(step)[1])


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mirrored"))
  _run_workers([("mirrored", out)], out, [_env()])
  return np.load(os.path.join(out, "mirrored.npz"))


def test_mirrored_masks_match_numpy_on_every_replica(mirrored):
  d = mirrored
  assert int(d["replicas"]) == 2
  _assert_copies_identical(d, "phase1")
  assert _layers(d, "phase1") == ["prune_block_dense", "prune_block_gru",
                                  "prune_block_lstm"]
  for layer in _layers(d, "phase1"):
    np.testing.assert_array_equal(d[f"phase1/{layer}/step"], [4, 4])
    kept = []
    for path in _weights(d, "phase1", layer):
      key = f"phase1/{layer}/{path}"
      w0, gates = d[f"w0/{layer}/{path}"], int(d[key + "/gates"])
      mask = d[key + "/mask"][0]
      if layer == "prune_block_gru":
        # θ = 2q·2/(2·2 + 3·4) = q/4, φ = 1.5θ; step 3 is the ramp step:
        # ε(3) = (θ·3 + φ·1)/2 · 4^(1/4)
        q = np.percentile(np.abs(w0), 90)
        assert float(d[key + "/q"][0]) == pytest.approx(q, rel=1e-5)
        eps3 = (q / 4 * 3 + 1.5 * q / 4) / 2 * np.sqrt(2.0)
        want = np_blocks.representatives(w0, BS, "max", gates) >= eps3
      else:                            # top blocks at the step-3 sparsity
        reps = np_blocks.representatives(w0, BS, "max", gates)
        want = np_blocks.top_blocks(reps, _poly(3))
      kept.append(want.ravel())
      np.testing.assert_array_equal(
          mask, np_blocks.expand(want, w0.shape, BS, gates), err_msg=key)
      np.testing.assert_array_equal(d[key + "/weight"][0], w0 * mask)
    assert 0 < np.concatenate(kept).mean() < 1, layer   # a real test


def test_mirrored_training_reaches_the_target_and_resumes(mirrored):
  d = mirrored
  for prefix in ("phase2", "loaded_keras", "loaded_h5", "loaded_tf",
                 "resumed_original", "resumed_loaded"):
    _assert_copies_identical(d, prefix)
  for layer in _layers(d, "phase2"):
    np.testing.assert_array_equal(d[f"phase2/{layer}/step"], [8, 8])
    np.testing.assert_array_equal(d[f"resumed_loaded/{layer}/step"], [10, 10])
    for path in _weights(d, "phase2", layer):
      key = f"{layer}/{path}"
      gates = int(d[f"phase2/{key}/gates"])
      mask = d[f"phase2/{key}/mask"][0]
      weight = d[f"phase2/{key}/weight"][0]
      assert not np.any(weight[mask == 0])
      np_blocks.assert_block_structure(weight, BS, gates)
      if layer != "prune_block_gru":
        assert _sparsity_ok(mask, gates, 0.75), key
      for fmt in ("keras", "h5", "tf"):     # the same state comes back
        for what in ("mask", "weight", "threshold", "q"):
          np.testing.assert_array_equal(d[f"loaded_{fmt}/{key}/{what}"],
                                        d[f"phase2/{key}/{what}"])
      for what in ("mask", "weight", "threshold", "q"):
        np.testing.assert_allclose(d[f"resumed_loaded/{key}/{what}"],
                                   d[f"resumed_original/{key}/{what}"],
                                   rtol=1e-6, atol=1e-7)
  for fmt in ("keras", "h5", "tf"):
    for layer in _layers(d, "phase2"):
      np.testing.assert_array_equal(d[f"loaded_{fmt}/{layer}/step"], [8, 8])


def test_mirrored_custom_loop_steps_once_per_global_step(mirrored):
  d = mirrored
  _assert_copies_identical(d, "loop")
  layers = _layers(d, "loop")
  assert len(layers) == 2
  for layer in layers:
    # 3 global steps of 2 replicas each: the step advanced 3 times
    np.testing.assert_array_equal(d[f"loop/{layer}/step"], [3, 3])
    for path in _weights(d, "loop", layer):
      key = f"loop/{layer}/{path}"
      # masks updated at steps 1 and 3
      assert _sparsity_ok(d[key + "/mask"][0], int(d[key + "/gates"]),
                          _poly(3)), key


def test_mirrored_group_lasso_is_counted_once(mirrored):
  d = mirrored
  mse = np.mean((d["glp_pred"] - d["glp_y"]) ** 2)
  penalty = 0.0
  for key in d.files:
    if key.startswith("glp/"):
      w = d[key]
      for _, _, _, b in np_blocks.blocks(w, BS, 4):
        penalty += np.sqrt(np.sum(b.astype(np.float64) ** 2))
  assert float(d["glp_loss"]) == pytest.approx(mse + 0.5 * penalty, rel=1e-5)


def _free_ports(n):
  socks = []
  for _ in range(n):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def test_multi_worker_mirrored_two_processes(tmp_path):
  out = str(tmp_path)
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  envs = [_env(TF_CONFIG=(
      '{"cluster": {"worker": ["%s", "%s"]}, '
      '"task": {"type": "worker", "index": %d}}' % (*workers, i)))
          for i in range(2)]
  _run_workers([("multi_worker", out, str(i)) for i in range(2)], out, envs)
  d0, d1 = [np.load(os.path.join(out, f"worker{i}.npz")) for i in range(2)]
  assert int(d0["replicas"]) == int(d1["replicas"]) == 2
  assert d0.files == d1.files
  for key in d0.files:       # identical on both workers, bit for bit
    np.testing.assert_array_equal(d0[key], d1[key], err_msg=key)
  assert _layers(d0, "trained") == ["prune_block_dense", "prune_block_lstm"]
  for layer in _layers(d0, "trained"):
    np.testing.assert_array_equal(d0[f"trained/{layer}/step"], [8])
    np.testing.assert_array_equal(d0[f"loaded/{layer}/step"], [8])
    for path in _weights(d0, "trained", layer):
      key = f"{layer}/{path}"
      gates = int(d0[f"trained/{key}/gates"])
      for what in ("mask", "weight", "threshold", "q"):
        np.testing.assert_array_equal(d0[f"loaded/{key}/{what}"],
                                      d0[f"trained/{key}/{what}"])
      mask = d0[f"trained/{key}/mask"][0]
      assert not np.any(d0[f"trained/{key}/weight"][0][mask == 0])
      assert _sparsity_ok(mask, gates, 0.75), key
  assert len(glob.glob(os.path.join(out, "worker*.keras"))) == 2


def _single_device_model(lr):
  inp = tf_keras.Input((3, 4))
  x = tfbs.prune_block_low_magnitude(
      tf_keras.layers.LSTM(4), block_size=BS,
      pruning_schedule=tfbs.schedules.ConstantSparsity(0.5, 0, frequency=1))(
          inp)
  model = tf_keras.Model(inp, x)
  rng = np.random.RandomState(0)
  model.set_weights([rng.uniform(-1, 1, w.shape).astype(np.float32)
                     if w.trainable else w.numpy() for w in model.weights])
  model.compile(helpers.sgd(lr), "mse")
  return model


@pytest.mark.parametrize("make", [
    lambda: tf.distribute.OneDeviceStrategy("/cpu:0"),
    lambda: tf.distribute.MirroredStrategy(["/cpu:0"])],
                         ids=["one_device", "mirrored_one_device"])
def test_single_device_strategies(make):
  strategy = make()
  with strategy.scope():
    model = _single_device_model(lr=0.0)
  layer = model.layers[1]
  w0 = [mw.weight.numpy() for mw in layer.masked_weights]
  helpers.fit_steps(model, 2)
  assert int(layer.pruning_step.numpy()) == 2
  for mw, init in zip(layer.masked_weights, w0):
    reps = np_blocks.representatives(init, BS, "max", mw.gates)
    want = np_blocks.expand(np_blocks.top_blocks(reps, 0.5), init.shape, BS,
                            mw.gates)
    np.testing.assert_array_equal(mw.mask.numpy(), want)
    np.testing.assert_array_equal(mw.weight.numpy(), init * want)
  for mw in layer.masked_weights:   # as an optimizer step would
    mw.weight.assign(mw.weight + 1.0)
  stripped = tfbs.strip_block_pruning(model)   # re-masks every copy
  assert stripped.layers[1] is layer.layer
  for mw in layer.masked_weights:
    for copy in getattr(mw.weight, "values", (mw.weight,)):
      assert not np.any(copy.numpy()[mw.mask.numpy() == 0])
