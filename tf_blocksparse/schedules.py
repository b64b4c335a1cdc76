"""Pruning schedules: `tfbs.schedules.GradualThreshold` (threshold mode) and
tfmot's sparsity-target schedules, re-exported so one import serves both.

>>> import tf_blocksparse as tfbs
>>> s = tfbs.schedules.GradualThreshold(0, 100, 200, frequency=10)
>>> c = tfbs.schedules.ConstantSparsity(0.8, begin_step=0)
"""

from tf_blocksparse.pruning.schedules import ConstantSparsity
from tf_blocksparse.pruning.schedules import GradualThreshold
from tf_blocksparse.pruning.schedules import PolynomialDecay
from tf_blocksparse.pruning.schedules import PruningSchedule
