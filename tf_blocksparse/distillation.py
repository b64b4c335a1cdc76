"""Knowledge distillation: a pruned student trained towards a dense teacher.

Pruning research recovers part of the accuracy a sparse model loses by
training it on the dense model's soft predictions as well as on the labels
(Hinton et al. 2015; used for pruned language models by, e.g., Sanh et al.
2020). `distillation_loss` is the math (no Keras); `Distiller` is the
`model.fit` wrapper: it runs the frozen teacher on each batch and trains the
student on `alpha * hard + (1 - alpha) * T^2 * KL(teacher_T || student_T)`,
where `_T` is the softmax at temperature T. The pruning callbacks find the
student's pruning wrappers through the Distiller.
"""

import tensorflow as tf
import tf_keras


def distillation_loss(student_logits, teacher_logits, temperature=2.0):
  """Mean over every prediction of `T^2 * KL(softmax(t/T) || softmax(s/T))`.

  Args:
    student_logits: `[..., classes]` logits.
    teacher_logits: the same shape; treated as constants (no gradient).
    temperature: T > 0. The T^2 factor keeps the gradient's scale that of
      the hard loss as T changes (Hinton et al. 2015).

  Returns:
    A scalar: the KL divergence in nats, averaged over all leading
    positions (batch and time), times T^2.

  Example:

  >>> import numpy as np, tf_blocksparse as tfbs
  >>> same = np.array([[1.0, 2.0, 0.5]], np.float32)
  >>> float(tfbs.distillation.distillation_loss(same, same))
  0.0
  """
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  student = tf.convert_to_tensor(student_logits)
  teacher = tf.stop_gradient(tf.cast(teacher_logits, student.dtype))
  if student.shape.rank is not None and teacher.shape.rank is not None:
    if not student.shape.is_compatible_with(teacher.shape):
      raise ValueError(
          f"student logits {student.shape} and teacher logits "
          f"{teacher.shape} differ: the teacher must predict the same "
          "classes at the same positions")
  t = tf.cast(temperature, student.dtype)
  teacher_log_p = tf.nn.log_softmax(teacher / t, axis=-1)
  student_log_p = tf.nn.log_softmax(student / t, axis=-1)
  kl = tf.reduce_sum(tf.exp(teacher_log_p) * (teacher_log_p - student_log_p),
                     axis=-1)
  return tf.reduce_mean(kl) * t * t


@tf_keras.utils.register_keras_serializable(package="tf_blocksparse")
class Distiller(tf_keras.Model):
  """Trains `student` on the labels and on a frozen `teacher`'s logits.

  Compile it as the student would be (optimizer, the hard loss on logits,
  metrics) and `fit` it with the student's data and callbacks (e.g.
  `tfbs.UpdatePruningStep()` for a pruning-wrapped student). Calling it runs
  the student; evaluation reports the student's hard loss. Afterwards use
  `distiller.student` (strip it, convert it, export it).

  Args:
    student: the model to train (pruning-wrapped or not); its outputs are
      logits.
    teacher: a trained model with the same inputs and logits of the same
      shape; it is not trained.
    alpha: weight of the hard loss, in [0, 1]; `1 - alpha` weighs the
      distillation term.
    temperature: softmax temperature of the distillation term.

  Example:

  >>> import numpy as np, tf_keras, tf_blocksparse as tfbs
  >>> def lm():
  ...   return tf_keras.Sequential([tf_keras.Input((None, 4)),
  ...                               tf_keras.layers.LSTM(8, return_sequences=True),
  ...                               tf_keras.layers.Dense(4)])
  >>> distiller = tfbs.distillation.Distiller(lm(), teacher=lm(), alpha=0.5)
  >>> distiller.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(
  ...     from_logits=True))
  >>> x = np.eye(4, dtype="float32")[np.random.randint(0, 4, (8, 5))]
  >>> y = np.random.randint(0, 4, (8, 5))
  >>> sorted(distiller.fit(x, y, epochs=1, verbose=0).history)
  ['distillation_loss', 'hard_loss', 'loss']
  """

  def __init__(self, student, teacher, alpha=0.5, temperature=2.0, **kwargs):
    super().__init__(**kwargs)
    if not isinstance(student, tf_keras.Model) or not isinstance(
        teacher, tf_keras.Model):
      raise TypeError("student and teacher must be tf_keras models, got "
                      f"{type(student).__name__} and {type(teacher).__name__}")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature!r}")
    self.student = student
    self.teacher = teacher
    self.teacher.trainable = False
    self.alpha = float(alpha)
    self.temperature = float(temperature)

  def call(self, inputs, training=None):
    return self.student(inputs, training=training)

  def _hard_loss(self, y, logits, sample_weight):
    return self.compiled_loss(y, logits, sample_weight,
                              regularization_losses=self.student.losses)

  def train_step(self, data):
    x, y, sample_weight = tf_keras.utils.unpack_x_y_sample_weight(data)
    teacher_logits = self.teacher(x, training=False)
    with tf.GradientTape() as tape:
      logits = self.student(x, training=True)
      hard = self._hard_loss(y, logits, sample_weight)
      soft = distillation_loss(logits, teacher_logits, self.temperature)
      loss = self.alpha * hard + (1.0 - self.alpha) * soft
    variables = self.student.trainable_variables
    self.optimizer.apply_gradients(zip(tape.gradient(loss, variables),
                                       variables))
    self.compiled_metrics.update_state(y, logits, sample_weight)
    return {"loss": loss, "hard_loss": hard, "distillation_loss": soft,
            **{m.name: m.result() for m in self.compiled_metrics.metrics}}

  def test_step(self, data):
    x, y, sample_weight = tf_keras.utils.unpack_x_y_sample_weight(data)
    logits = self.student(x, training=False)
    hard = self._hard_loss(y, logits, sample_weight)
    self.compiled_metrics.update_state(y, logits, sample_weight)
    return {"loss": hard,
            **{m.name: m.result() for m in self.compiled_metrics.metrics}}

  def get_config(self):
    return {"student": tf_keras.saving.serialize_keras_object(self.student),
            "teacher": tf_keras.saving.serialize_keras_object(self.teacher),
            "alpha": self.alpha, "temperature": self.temperature,
            "name": self.name}

  @classmethod
  def from_config(cls, config, custom_objects=None):
    config = dict(config)
    for key in ("student", "teacher"):
      config[key] = tf_keras.saving.deserialize_keras_object(
          config[key], custom_objects=custom_objects)
    return cls(**config)
