"""Block-term tensor decomposition helpers (Ye et al. 2018, 2020).

`factorize_shape` proposes balanced mode factorisations and
`compression_ratio`/`parameter_count` size a decomposition; the layers that
use it are `tf_blocksparse.layers.BlockTermDense`, `BlockTermLSTM` and
`BlockTermGRU`.
"""

from tf_blocksparse.block_term.decomposition import block_term_matmul
from tf_blocksparse.block_term.decomposition import block_term_to_dense
from tf_blocksparse.block_term.decomposition import check_shapes
from tf_blocksparse.block_term.decomposition import compression_ratio
from tf_blocksparse.block_term.decomposition import factorize_shape
from tf_blocksparse.block_term.decomposition import glorot_stddevs
from tf_blocksparse.block_term.decomposition import parameter_count
