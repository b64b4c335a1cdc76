"""Block pruning of tf_keras models on top of tensorflow-model-optimization."""

from tf_blocksparse.pruning.callbacks import PruningSummaries
from tf_blocksparse.pruning.callbacks import UpdatePruningStep
from tf_blocksparse.pruning.prune import prune_block_low_magnitude
from tf_blocksparse.pruning.prune import strip_block_pruning
from tf_blocksparse.pruning.schedules import ConstantSparsity
from tf_blocksparse.pruning.schedules import GradualThreshold
from tf_blocksparse.pruning.schedules import PolynomialDecay
from tf_blocksparse.pruning.wrapper import PruneBlockLowMagnitude
