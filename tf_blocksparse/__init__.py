"""tf_blocksparse: block-sparse recurrent networks for TensorFlow / tf_keras."""

from tf_blocksparse import ops
from tf_blocksparse.bsr import BlockSparseMatrix

__version__ = "0.1.0"
