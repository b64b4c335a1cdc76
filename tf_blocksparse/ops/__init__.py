"""Block-sparse ops: compiled kernels with a pure-TF fallback."""

from tf_blocksparse.ops._loader import use_custom_ops
from tf_blocksparse.ops.bsr_matmul import bsr_matmul
from tf_blocksparse.ops.bsr_matmul import custom_ops_available
