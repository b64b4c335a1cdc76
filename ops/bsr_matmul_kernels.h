// Input checking shared by the CPU and GPU OpKernels of the BSR ops.
#ifndef TF_BLOCKSPARSE_OPS_BSR_MATMUL_KERNELS_H_
#define TF_BLOCKSPARSE_OPS_BSR_MATMUL_KERNELS_H_

#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bsr_structure.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace tfbs {

// Checks the ranks of the BSR inputs that start at input index `first`.
inline ::tensorflow::Status CheckBsrRanks(::tensorflow::OpKernelContext* ctx,
                                          int first) {
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
  return ::tensorflow::Status();
}

// Validates the BSR inputs (values, col_indices, row_ptr, dense_shape) that
// start at input index `first`. The index arrays must be in host memory.
inline ::tensorflow::Status ValidateBsrInputs(
    ::tensorflow::OpKernelContext* ctx, int first, BsrGeometry* geo) {
  using ::tensorflow::errors::InvalidArgument;
  TF_RETURN_IF_ERROR(CheckBsrRanks(ctx, first));
  const ::tensorflow::Tensor& values = ctx->input(first);
  const ::tensorflow::Tensor& col_indices = ctx->input(first + 1);
  const ::tensorflow::Tensor& row_ptr = ctx->input(first + 2);
  const ::tensorflow::Tensor& dense_shape = ctx->input(first + 3);
  const auto shape = dense_shape.flat<int64_t>();
  const std::string error = ValidateBsr(
      shape(0), shape(1), values.dim_size(1), values.dim_size(2),
      values.dim_size(0), col_indices.flat<int32_t>().data(),
      col_indices.NumElements(), row_ptr.flat<int32_t>().data(),
      row_ptr.NumElements(), geo);
  if (!error.empty()) return InvalidArgument(error);
  return ::tensorflow::Status();
}

// Builds the shape of an output from validated dimensions, failing (instead
// of TensorShape's CHECK, which aborts the process) when the number of
// elements would overflow int64. `what` names the output in the message.
inline ::tensorflow::Status MakeOutputShape(std::initializer_list<int64_t> dims,
                                            const char* what,
                                            ::tensorflow::TensorShape* out) {
  int64_t elements = 1;
  std::string listed;
  bool overflow = false;
  for (const int64_t d : dims) {
    listed += (listed.empty() ? "" : ", ") + std::to_string(d);
    if (!overflow && !CheckedMul(elements, d, &elements)) overflow = true;
  }
  if (overflow) {
    return ::tensorflow::errors::InvalidArgument(
        what, " [", listed, "] would have more than 2^63 - 1 elements");
  }
  return ::tensorflow::TensorShape::BuildTensorShape(dims, out);
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

// A validated layout and what the kernels derive from it.
struct BsrLayout {
  BsrGeometry geo;  // geo.m is not part of the layout
  std::vector<int32_t> col_indices;  // copies, to recognise the layout
  std::vector<int32_t> row_ptr;
  std::vector<int32_t> block_rows;   // block row of every stored block

  // For x @ W and the recurrences. Built on first use, not with the
  // layout: its size is O(nbc), bounded only by the dense shape, so a
  // kernel asks for it once it holds a non-empty output at least that wide
  // (a huge dense shape then fails on the output, never here).
  const BsrColumnIndex& ColumnIndex() const {
    std::call_once(column_index_once_, [this] {
      BuildColumnIndex(geo, col_indices.data(), row_ptr.data(),
                       &column_index_);
    });
    return column_index_;
  }

 private:
  mutable std::once_flag column_index_once_;
  mutable BsrColumnIndex column_index_;
};

// The last layout an OpKernel saw. Validation and the column index are
// O(nnzb) with branches and allocations; a model calls each op with the
// same layout every time, so a call whose index arrays equal the cached
// ones (a memcmp, several GB/s) reuses them. Every input is still checked:
// equal to a validated layout is validated.
class LayoutCache {
 public:
  ::tensorflow::Status Get(::tensorflow::OpKernelContext* ctx, int first,
                           std::shared_ptr<const BsrLayout>* out) {
    TF_RETURN_IF_ERROR(CheckBsrRanks(ctx, first));
    const ::tensorflow::Tensor& values = ctx->input(first);
    const ::tensorflow::Tensor& cols_t = ctx->input(first + 1);
    const ::tensorflow::Tensor& ptr_t = ctx->input(first + 2);
    const auto shape = ctx->input(first + 3).flat<int64_t>();
    const int32_t* cols = cols_t.flat<int32_t>().data();
    const int32_t* ptr = ptr_t.flat<int32_t>().data();
    const int64_t num_cols = cols_t.NumElements();
    const int64_t num_ptr = ptr_t.NumElements();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (last_ != nullptr && Same(*last_, shape(0), shape(1),
                                   values.dim_size(1), values.dim_size(2),
                                   values.dim_size(0), cols, num_cols, ptr,
                                   num_ptr)) {
        *out = last_;
        return ::tensorflow::Status();
      }
    }
    auto layout = std::make_shared<BsrLayout>();
    const std::string error =
        ValidateBsr(shape(0), shape(1), values.dim_size(1), values.dim_size(2),
                    values.dim_size(0), cols, num_cols, ptr, num_ptr,
                    &layout->geo);
    if (!error.empty()) return ::tensorflow::errors::InvalidArgument(error);
    layout->col_indices.assign(cols, cols + num_cols);
    layout->row_ptr.assign(ptr, ptr + num_ptr);
    layout->block_rows.resize(layout->geo.nnzb);
    for (int64_t i = 0; i < layout->geo.nbr; ++i)
      for (int32_t p = ptr[i]; p < ptr[i + 1]; ++p)
        layout->block_rows[p] = static_cast<int32_t>(i);
    std::lock_guard<std::mutex> lock(mu_);
    last_ = layout;
    *out = std::move(layout);
    return ::tensorflow::Status();
  }

 private:
  static bool Same(const BsrLayout& l, int64_t k, int64_t n, int64_t bh,
                   int64_t bw, int64_t nnzb, const int32_t* cols,
                   int64_t num_cols, const int32_t* ptr, int64_t num_ptr) {
    const BsrGeometry& g = l.geo;
    return g.k == k && g.n == n && g.bh == bh && g.bw == bw &&
           g.nnzb == nnzb &&
           static_cast<int64_t>(l.col_indices.size()) == num_cols &&
           static_cast<int64_t>(l.row_ptr.size()) == num_ptr &&
           // (memcmp must not see the null data() of an empty vector)
           (num_cols == 0 ||
            std::memcmp(l.col_indices.data(), cols, 4 * num_cols) == 0) &&
           std::memcmp(l.row_ptr.data(), ptr, 4 * num_ptr) == 0;
  }

  std::mutex mu_;
  std::shared_ptr<const BsrLayout> last_;
};

}  // namespace tfbs

#endif  // TF_BLOCKSPARSE_OPS_BSR_MATMUL_KERNELS_H_
