"""GradualThreshold against hand-computed thresholds, and schedule plumbing."""

import numpy as np
import pytest
import tf_keras

import tf_blocksparse as tfbs
from tf_blocksparse.pruning import schedules

# start=10, ramp=30, end=50, freq=5, q=2:
#   θ = 2·2·5 / (2·20 + 3·20) = 20 / 100 = 0.2,  φ = 1.5·θ = 0.3
HAND = [
    (5, 0.0),                                   # before start
    (10, 0.2 * 1 / 5),                          # 0.04
    (20, 0.2 * 11 / 5),                         # 0.44
    (29, 0.2 * 20 / 5),                         # 0.80
    (30, (0.2 * 21 + 0.3 * 1) / 5),             # 0.90
    (40, (0.2 * 21 + 0.3 * 11) / 5),            # 1.50
    (50, (0.2 * 21 + 0.3 * 21) / 5),            # 2.10 (≈ q at the end)
    (70, (0.2 * 21 + 0.3 * 21) / 5),            # frozen after end
]


def _schedule(**kw):
  return tfbs.schedules.GradualThreshold(start_step=10, ramp_step=30,
                                         end_step=50, frequency=5, **kw)


@pytest.mark.parametrize("step,eps", HAND)
def test_threshold_matches_hand_computation(step, eps):
  assert float(_schedule().threshold(step, q=2.0)) == pytest.approx(eps,
                                                                    rel=1e-6)


def test_block_scaling_by_fourth_root_of_block_size():
  # 4x4 blocks: N_b = 16, 16^(1/4) = 2 -> every ε doubles.
  s = _schedule()
  assert float(s.threshold(20, 2.0, (4, 4))) == pytest.approx(0.88, rel=1e-6)
  assert float(s.threshold(40, 2.0, (4, 4))) == pytest.approx(3.0, rel=1e-6)
  # 1x2 blocks: 2^(1/4) = 1.189207...
  assert float(s.threshold(40, 2.0, (1, 2))) == pytest.approx(
      1.5 * 1.18920712, rel=1e-6)


def test_explicit_slopes_and_q():
  s = _schedule(start_slope=0.1, ramp_slope=0.5)
  assert float(s.threshold(20)) == pytest.approx(0.1 * 11 / 5, rel=1e-6)
  assert float(s.threshold(40)) == pytest.approx((0.1 * 21 + 0.5 * 11) / 5,
                                                 rel=1e-6)
  s = _schedule(q=4.0)   # θ = 0.4, φ = 0.6 (default 1.5 θ)
  assert float(s.threshold(40)) == pytest.approx((0.4 * 21 + 0.6 * 11) / 5,
                                                 rel=1e-6)
  with pytest.raises(ValueError, match="needs q"):
    _schedule().threshold(20)


def test_should_prune_every_frequency_steps_inside_window():
  s = _schedule()
  got = [int(step) for step in range(0, 80)
         if bool(s.should_prune(step))]
  assert got == [10, 15, 20, 25, 30, 35, 40, 45, 50]


@pytest.mark.parametrize("kwargs,match", [
    (dict(start_step=10, ramp_step=10, end_step=5), "end_step"),
    (dict(start_step=10, ramp_step=10, end_step=10), "end_step"),
    (dict(start_step=0, ramp_step=60, end_step=50), "ramp_step"),
    (dict(start_step=-1, ramp_step=0, end_step=5), "start_step"),
    (dict(start_step=0, ramp_step=1, end_step=5, frequency=0), "frequency"),
    (dict(start_step=0, ramp_step=1, end_step=5, q=-1.0), "q"),
    (dict(start_step=0, ramp_step=1, end_step=5, start_slope=0), "start_slope"),
])
def test_bad_schedules(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tfbs.schedules.GradualThreshold(**kwargs)


def test_serialization_round_trip():
  s = _schedule(q=1.5, ramp_slope=0.2)
  again = tfbs.schedules.GradualThreshold.from_config(s.get_config())
  assert again == s
  assert float(again.threshold(40)) == float(s.threshold(40))
  keras_cfg = tf_keras.utils.serialize_keras_object(s)
  assert tf_keras.utils.deserialize_keras_object(keras_cfg) == s
  for sched in (s, tfbs.schedules.PolynomialDecay(0.1, 0.8, 0, 100),
                tfbs.schedules.ConstantSparsity(0.7, 3, 9, 2)):
    back = schedules.deserialize(schedules.serialize(sched))
    assert type(back) is type(sched)
    assert back.get_config() == sched.get_config()


def test_tfmot_schedules_in_sparsity_mode():
  poly = schedules.as_block_schedule(
      tfbs.schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10,
                                     power=1, frequency=2))
  assert poly.mode == "sparsity"
  assert float(poly.sparsity(5)) == pytest.approx(0.4)
  assert [s for s in range(14) if bool(poly.should_prune(s))] == \
      [0, 2, 4, 6, 8, 10]
  forever = schedules.as_block_schedule(tfbs.schedules.ConstantSparsity(0.5, 4))
  assert [bool(forever.is_pruning(s)) for s in (3, 4, 10 ** 6)] == \
      [False, True, True]


def test_not_a_schedule():
  with pytest.raises(TypeError, match="PruningSchedule"):
    schedules.check_schedule(lambda step: 0.5)


def test_plotting_usage_over_many_steps():
  s = _schedule()
  eps = np.array([float(s.threshold(t, 2.0)) for t in range(0, 60)])
  assert np.all(np.diff(eps) >= 0)   # never decreases
  assert eps[50] == pytest.approx(2.1, rel=1e-6)


def test_target_sparsity_sets_q_from_block_representatives_unscaled():
  s = _schedule(target_sparsity=0.8)
  reps = np.arange(1.0, 11.0, dtype=np.float32)    # 1..10
  mags = np.linspace(0.0, 1.0, 50, dtype=np.float32)
  # np.percentile(1..10, 80) = 1 + 0.8·9 = 8.2; |w| is not used.
  assert float(s.measure_q(mags, reps)) == pytest.approx(8.2, rel=1e-6)
  # Without a target q is the 90th percentile of |w| (the paper's).
  assert float(_schedule().measure_q(mags, reps)) == pytest.approx(
      np.percentile(mags, 90), rel=1e-6)
  # No (bh·bw)^(1/4) factor: the representatives already carry the block.
  assert float(s.threshold(40, 2.0, (4, 4))) == pytest.approx(1.5, rel=1e-6)
  again = tfbs.schedules.GradualThreshold.from_config(s.get_config())
  assert again == s and again.target_sparsity == 0.8


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_sparsity=1.0), "target_sparsity"),
    (dict(target_sparsity=0.0), "target_sparsity"),
    (dict(target_sparsity="0.9"), "target_sparsity"),
    (dict(target_sparsity=0.9, q=1.0), "not both"),
    (dict(target_sparsity=0.9, start_slope=0.1), "not both"),
])
def test_bad_target_sparsity(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _schedule(**kwargs)


def test_target_sparsity_prunes_the_blocks_numpy_predicts():
  # Frozen weights (lr 0): the final mask is the blocks whose max |w| is at
  # least ε(end) = q·(2·(ramp−start+1) + 3·(end−ramp+1)) /
  # (2·(ramp−start) + 3·(end−ramp)), q the 0.7 quantile of the block maxima.
  from tests.pruning import helpers, np_blocks
  tf_keras.utils.set_random_seed(3)
  layer = tf_keras.layers.Dense(48, use_bias=False)
  model = tf_keras.Sequential([tf_keras.Input((32,)), layer])
  # Blocks of very different scales, so the block maxima spread out.
  rng = np.random.RandomState(0)
  w = (rng.randn(32, 48) * np.kron(rng.uniform(0.05, 1.0, (8, 12)),
                                   np.ones((4, 4)))).astype(np.float32)
  layer.kernel.assign(w)
  schedule = tfbs.schedules.GradualThreshold(
      start_step=0, ramp_step=4, end_step=10, frequency=2,
      target_sparsity=0.7)
  pruned = tfbs.prune_block_low_magnitude(model, block_size=(4, 4),
                                          pruning_schedule=schedule)
  pruned.compile(helpers.sgd(0.0), "mse")
  helpers.fit_steps(pruned, 12)
  reps = np_blocks.representatives(w, (4, 4), "max")
  q = np.percentile(reps, 70)
  eps_end = q * (2 * 5 + 3 * 7) / (2 * 4 + 3 * 6)
  kept = reps >= eps_end
  got = tfbs.strip_block_pruning(pruned).layers[0].kernel.numpy()
  np.testing.assert_array_equal(got, w * np_blocks.expand(kept, w.shape,
                                                          (4, 4)))
  assert 0.7 < 1 - kept.mean() < 0.9   # ε(end) is ~1.19 q
