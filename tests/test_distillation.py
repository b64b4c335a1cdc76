"""tf_blocksparse.distillation: the loss against numpy, the Distiller
against plain training and against hand-derived limits."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_blocksparse as tfbs
from tf_blocksparse.distillation import Distiller
from tf_blocksparse.distillation import distillation_loss


def _np_log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_loss_is_t_squared_kl_averaged_over_positions():
  rng = np.random.RandomState(0)
  s, t = rng.randn(2, 3, 5), rng.randn(2, 3, 5)
  temperature = 2.5
  lt, ls = _np_log_softmax(t / temperature), _np_log_softmax(s / temperature)
  expected = (np.exp(lt) * (lt - ls)).sum(-1).mean() * temperature ** 2
  got = distillation_loss(s.astype(np.float32), t.astype(np.float32),
                          temperature)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_no_gradient_reaches_the_teacher_and_zero_at_agreement():
  logits = tf.constant(np.random.RandomState(1).randn(4, 6), tf.float32)
  teacher = tf.Variable(logits)
  student = tf.Variable(logits)
  with tf.GradientTape(persistent=True) as tape:
    loss = distillation_loss(student, teacher)
  assert tape.gradient(loss, teacher) is None
  np.testing.assert_allclose(tape.gradient(loss, student), 0, atol=1e-6)
  assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_loss_arguments_are_checked():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    distillation_loss(np.zeros([1, 3]), np.zeros([1, 3]), 0.0)
  with pytest.raises(ValueError, match="teacher must predict the same"):
    distillation_loss(np.zeros([1, 3]), np.zeros([1, 4]))


def _lm(seed, units=8, classes=5):
  tf_keras.utils.set_random_seed(seed)
  return tf_keras.Sequential([
      tf_keras.Input((None, classes)),
      tf_keras.layers.LSTM(units, return_sequences=True),
      tf_keras.layers.Dense(classes)])


def _data(seed=0, n=16, steps=6, classes=5):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, classes, (n, steps + 1))
  return np.eye(classes, dtype=np.float32)[ids[:, :-1]], ids[:, 1:]


_LOSS = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_alpha_one_trains_exactly_as_the_student_alone():
  x, y = _data()
  alone = _lm(3)
  alone.compile(tf_keras.optimizers.SGD(0.5), _LOSS)
  alone.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
  distiller = Distiller(_lm(3), teacher=_lm(4), alpha=1.0)
  distiller.compile(tf_keras.optimizers.SGD(0.5), _LOSS)
  distiller.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
  for a, b in zip(alone.get_weights(), distiller.student.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_alpha_zero_pulls_the_student_to_the_teacher():
  x, y = _data(1)
  teacher = _lm(5)
  distiller = Distiller(_lm(6), teacher=teacher, alpha=0.0, temperature=1.0)
  distiller.compile(tf_keras.optimizers.Adam(0.02), _LOSS)
  before = float(distillation_loss(distiller.student(x), teacher(x), 1.0))
  teacher_weights = [w.copy() for w in teacher.get_weights()]
  history = distiller.fit(x, y, batch_size=16, epochs=30, verbose=0).history
  after = float(distillation_loss(distiller.student(x), teacher(x), 1.0))
  assert after < 0.3 * before, (before, after)
  assert history["distillation_loss"][-1] == pytest.approx(
      history["loss"][-1], rel=1e-6)   # alpha 0: the loss is the soft term
  for a, b in zip(teacher_weights, teacher.get_weights()):
    np.testing.assert_array_equal(a, b)   # the teacher is never trained


def test_pruning_callbacks_reach_the_students_wrappers():
  x, y = _data(2, n=32, classes=8)
  tf_keras.utils.set_random_seed(7)
  student = tf_keras.Sequential([
      tf_keras.Input((None, 8)),
      tfbs.prune_block_low_magnitude(
          tf_keras.layers.LSTM(8, return_sequences=True), block_size=(4, 4),
          pruning_schedule=tfbs.schedules.PolynomialDecay(
              initial_sparsity=0.0, final_sparsity=0.75, begin_step=0,
              end_step=2, frequency=1)),
      tf_keras.layers.Dense(8)])
  distiller = Distiller(student, teacher=_lm(8, classes=8), alpha=0.5)
  distiller.compile(tf_keras.optimizers.Adam(0.01), _LOSS)
  distiller.fit(x, y, batch_size=8, epochs=2, verbose=0,
                callbacks=[tfbs.UpdatePruningStep()])
  stripped = tfbs.strip_block_pruning(distiller.student)
  kernel = stripped.layers[0].cell.kernel.numpy()           # [8, 32]
  blocks = np.abs(kernel).reshape(2, 4, 8, 4).max(axis=(1, 3))
  assert (blocks == 0).mean() >= 0.75 - 1e-9


def test_config_round_trip_and_argument_checks():
  distiller = Distiller(_lm(9), teacher=_lm(10), alpha=0.3, temperature=4.0)
  clone = Distiller.from_config(distiller.get_config())
  assert (clone.alpha, clone.temperature) == (0.3, 4.0)
  assert clone.student.get_config() == distiller.student.get_config()
  x, _ = _data(3)
  assert clone(x).shape == distiller(x).shape == (16, 6, 5)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
    Distiller(_lm(1), teacher=_lm(2), alpha=1.5)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    Distiller(_lm(1), teacher=_lm(2), temperature=-1)
  with pytest.raises(TypeError, match="tf_keras models"):
    Distiller(_lm(1), teacher=lambda v: v)


def test_docstring_examples():
  import doctest  # pylint: disable=import-outside-toplevel
  from tf_blocksparse import distillation  # pylint: disable=import-outside-toplevel
  result = doctest.testmod(distillation)
  assert result.attempted > 0 and result.failed == 0
