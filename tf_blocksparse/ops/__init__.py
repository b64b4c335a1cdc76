"""Block-sparse ops: compiled kernels with a pure-TF fallback."""

from tf_blocksparse.ops._loader import use_custom_ops
from tf_blocksparse.ops.bsr_matmul import bsr_matmul
from tf_blocksparse.ops.bsr_matmul import custom_ops_available
from tf_blocksparse.ops.bsr_rnn import gru_sequence
from tf_blocksparse.ops.bsr_rnn import lstm_sequence
from tf_blocksparse.ops.bsr_rnn import simple_rnn_sequence
from tf_blocksparse.ops.kernel_info import kernel_info
from tf_blocksparse.ops.kernel_info import set_kernel_isa
