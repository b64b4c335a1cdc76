// Input checking shared by the CPU and GPU OpKernels of the BSR ops.
#ifndef TF_BLOCKSPARSE_OPS_BSR_MATMUL_KERNELS_H_
#define TF_BLOCKSPARSE_OPS_BSR_MATMUL_KERNELS_H_

#include <vector>

#include "bsr_structure.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace tfbs {

// Validates the BSR inputs (values, col_indices, row_ptr, dense_shape) that
// start at input index `first`. The index arrays must be in host memory.
inline ::tensorflow::Status ValidateBsrInputs(
    ::tensorflow::OpKernelContext* ctx, int first, BsrGeometry* geo) {
  using ::tensorflow::errors::InvalidArgument;
  const ::tensorflow::Tensor& values = ctx->input(first);
  const ::tensorflow::Tensor& col_indices = ctx->input(first + 1);
  const ::tensorflow::Tensor& row_ptr = ctx->input(first + 2);
  const ::tensorflow::Tensor& dense_shape = ctx->input(first + 3);
  if (values.dims() != 3) {
    return InvalidArgument("values must have rank 3 [nnzb, bh, bw], got shape ",
                           values.shape().DebugString());
  }
  if (col_indices.dims() != 1) {
    return InvalidArgument("col_indices must be a vector, got shape ",
                           col_indices.shape().DebugString());
  }
  if (row_ptr.dims() != 1 || row_ptr.NumElements() < 1) {
    return InvalidArgument("row_ptr must be a non-empty vector, got shape ",
                           row_ptr.shape().DebugString());
  }
  if (dense_shape.dims() != 1 || dense_shape.NumElements() != 2) {
    return InvalidArgument("dense_shape must be a vector [K, N], got shape ",
                           dense_shape.shape().DebugString());
  }
  const auto shape = dense_shape.flat<int64_t>();
  const std::string error = ValidateBsr(
      shape(0), shape(1), values.dim_size(1), values.dim_size(2),
      values.dim_size(0), col_indices.flat<int32_t>().data(),
      col_indices.NumElements(), row_ptr.flat<int32_t>().data(),
      row_ptr.NumElements(), geo);
  if (!error.empty()) return InvalidArgument(error);
  return ::tensorflow::Status();
}

// Checks a dense operand: rank 2 with `cols` columns and the values' dtype.
inline ::tensorflow::Status ValidateDense(const ::tensorflow::Tensor& t,
                                         const char* name, int64_t cols,
                                         const char* cols_name) {
  using ::tensorflow::errors::InvalidArgument;
  if (t.dims() != 2) {
    return InvalidArgument(name, " must have rank 2, got shape ",
                           t.shape().DebugString());
  }
  if (t.dim_size(1) != cols) {
    return InvalidArgument(name, " has ", t.dim_size(1),
                           " columns but the sparse matrix has ", cols_name,
                           " = ", cols);
  }
  return ::tensorflow::Status();
}

// Validates the inputs of a product op: the dense operand (input 0; [m, K]
// for x @ W, [m, N] for dy @ W^T when `transposed`) and the BSR inputs
// 1..4; sets geo->m.
inline ::tensorflow::Status ValidateProductInputs(
    ::tensorflow::OpKernelContext* ctx, bool transposed, BsrGeometry* geo) {
  TF_RETURN_IF_ERROR(ValidateBsrInputs(ctx, 1, geo));
  const ::tensorflow::Tensor& in = ctx->input(0);
  TF_RETURN_IF_ERROR(transposed ? ValidateDense(in, "dy", geo->n, "N")
                                : ValidateDense(in, "x", geo->k, "K"));
  geo->m = in.dim_size(0);
  return ::tensorflow::Status();
}

// Validates the inputs of TfbsBsrMatmulValuesGrad: x [m, K], dy [m, N],
// then the BSR inputs; sets geo->m.
inline ::tensorflow::Status ValidateValuesGradInputs(
    ::tensorflow::OpKernelContext* ctx, BsrGeometry* geo) {
  TF_RETURN_IF_ERROR(ValidateBsrInputs(ctx, 2, geo));
  const ::tensorflow::Tensor& x = ctx->input(0);
  const ::tensorflow::Tensor& dy = ctx->input(1);
  TF_RETURN_IF_ERROR(ValidateDense(x, "x", geo->k, "K"));
  TF_RETURN_IF_ERROR(ValidateDense(dy, "dy", geo->n, "N"));
  if (x.dim_size(0) != dy.dim_size(0)) {
    return ::tensorflow::errors::InvalidArgument(
        "x and dy must have the same number of rows, got ", x.dim_size(0),
        " and ", dy.dim_size(0));
  }
  geo->m = x.dim_size(0);
  return ::tensorflow::Status();
}

// Block row of every stored block (from validated row pointers), so that
// blocks can be processed independently.
inline std::vector<int32_t> BlockRows(const ::tensorflow::Tensor& row_ptr,
                                      const BsrGeometry& geo) {
  const int32_t* ptr = row_ptr.flat<int32_t>().data();
  std::vector<int32_t> rows(geo.nnzb);
  for (int64_t i = 0; i < geo.nbr; ++i)
    for (int32_t p = ptr[i]; p < ptr[i + 1]; ++p) rows[p] = static_cast<int32_t>(i);
  return rows;
}

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_MATMUL_KERNELS_H_
