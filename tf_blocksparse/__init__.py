"""tf_blocksparse: block-sparse recurrent networks for TensorFlow / tf_keras."""

# First, so that another TensorFlow fails here with what to install rather
# than later on an undefined symbol or a Keras mismatch.
from tf_blocksparse import _tf_version
_tf_version.check_installed()

from tf_blocksparse import ops
from tf_blocksparse.bsr import BlockSparseMatrix

__version__ = "0.1.0"
from tf_blocksparse import block_term
from tf_blocksparse import distillation
from tf_blocksparse import layers
from tf_blocksparse import regularizers
from tf_blocksparse import schedules
from tf_blocksparse.pruning import PruningSummaries
from tf_blocksparse.pruning import UpdatePruningStep
from tf_blocksparse.pruning import prune_block_low_magnitude
from tf_blocksparse.pruning import strip_block_pruning
from tf_blocksparse.reporting import plot_block_masks
from tf_blocksparse.reporting import sparsity_report
from tf_blocksparse.conversion import to_block_sparse
from tf_blocksparse import export
