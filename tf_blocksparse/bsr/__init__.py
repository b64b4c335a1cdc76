"""Block compressed sparse row (BSR) storage."""

from tf_blocksparse.bsr.matrix import BlockSparseMatrix
