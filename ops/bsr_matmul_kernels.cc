// CPU OpKernels of the BSR matmul ops: validation, the per-call column
// index, and work splitting over TensorFlow's intra-op thread pool. The
// arithmetic is in bsr_matmul_cpu_kernels.cc.
#include <algorithm>
#include <vector>

#include "bsr_matmul_cpu_kernels.h"
#include "bsr_matmul_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tfbs {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

namespace {

// Dense rows per work unit: a multiple of every register tile height, and
// small enough that M = 256 still splits into several units per group.
constexpr int64_t kRowsPerUnit = 48;

// From this many dense rows on, the dense operand is first packed block
// column by block column (PackBlockColumns): ~10% faster at M = 256, not
// worth a copy for a handful of rows.
constexpr int64_t kMinRowsToPack = 32;

// Runs the grouped product over (group, row chunk) units on the pool.
// `args.in` is row-major [m, args.in_cols]; the strides are set here.
template <typename T>
::tensorflow::Status RunGroupedProduct(OpKernelContext* ctx,
                                       GroupedProductArgs<T> args,
                                       int64_t num_groups, int64_t m,
                                       int64_t nnzb) {
  if (num_groups == 0 || m == 0) return ::tensorflow::Status();
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  args.in_row_stride = args.in_cols;
  args.in_block_stride = args.bi;
  Tensor packed;
  if (m >= kMinRowsToPack) {
    const int64_t in_blocks = (args.in_cols + args.bi - 1) / args.bi;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        ::tensorflow::DataTypeToEnum<T>::value,
        TensorShape({in_blocks * m * args.bi}), &packed));
    T* dst = packed.flat<T>().data();
    const T* src = args.in;
    const int64_t cols = args.in_cols, bi = args.bi;
    pool->ParallelFor(in_blocks, m * bi, [&](int64_t begin, int64_t end) {
      PackBlockColumns<T>(src, m, cols, bi, dst, begin, end);
    });
    args.in = dst;
    args.in_row_stride = bi;
    args.in_block_stride = m * bi;
  }
  const int64_t row_chunks = (m + kRowsPerUnit - 1) / kRowsPerUnit;
  const int64_t rows = std::min(m, kRowsPerUnit);
  const int64_t cost = std::max<int64_t>(
      1, rows * (nnzb / num_groups + 1) * args.bi * args.bo * 2);
  pool->ParallelFor(num_groups * row_chunks, cost,
                    [&](int64_t begin, int64_t end) {
                      for (int64_t u = begin; u < end; ++u) {
                        const int64_t g = u / row_chunks;
                        const int64_t c = u % row_chunks;
                        const int64_t m0 = c * kRowsPerUnit;
                        const int64_t m1 = std::min(m, m0 + kRowsPerUnit);
                        GroupedBlockProduct<T>(args, g, g + 1, m0, m1);
                      }
                    });
  return ::tensorflow::Status();
}

template <typename T>
class BsrMatmulOp : public OpKernel {
 public:
  explicit BsrMatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BsrGeometry geo;
    OP_REQUIRES_OK(ctx, ValidateProductInputs(ctx, /*transposed=*/false, &geo));
    const Tensor& x = ctx->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({geo.m, geo.n}), &y));
    if (y->NumElements() == 0) return;
    if (geo.nnzb == 0 || geo.k == 0) {
      std::fill_n(y->flat<T>().data(), y->NumElements(), T(0));
      return;
    }
    BsrColumnIndex index;
    BuildColumnIndex(geo, ctx->input(2).flat<int32_t>().data(),
                     ctx->input(3).flat<int32_t>().data(), &index);
    GroupedProductArgs<T> args;
    args.in = x.flat<T>().data();
    args.in_cols = geo.k;
    args.blocks = ctx->input(1).flat<T>().data();
    args.bi = geo.bh;
    args.bo = geo.bw;
    args.group_ptr = index.col_ptr.data();
    args.ids = index.block_ids.data();
    args.in_block = index.block_rows.data();
    args.out = y->flat<T>().data();
    args.out_cols = geo.n;
    OP_REQUIRES_OK(ctx, RunGroupedProduct(ctx, args, geo.nbc, geo.m, geo.nnzb));
  }
};

template <typename T>
class BsrMatmulTransposedOp : public OpKernel {
 public:
  explicit BsrMatmulTransposedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BsrGeometry geo;
    OP_REQUIRES_OK(ctx, ValidateProductInputs(ctx, /*transposed=*/true, &geo));
    const Tensor& dy = ctx->input(0);
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({geo.m, geo.k}), &dx));
    if (dx->NumElements() == 0) return;
    if (geo.nnzb == 0 || geo.n == 0) {
      std::fill_n(dx->flat<T>().data(), dx->NumElements(), T(0));
      return;
    }
    // Blocks transposed once per call so that the product below is the same
    // register-tiled kernel as the forward pass, grouped by block row.
    Tensor transposed;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(ctx->input(1).dtype(),
                                           ctx->input(1).shape(), &transposed));
    const T* values = ctx->input(1).flat<T>().data();
    T* values_t = transposed.flat<T>().data();
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(geo.nnzb, geo.bh * geo.bw * 2,
                      [&](int64_t begin, int64_t end) {
                        TransposeBlocks<T>(values, geo.bh, geo.bw, values_t,
                                           begin, end);
                      });
    GroupedProductArgs<T> args;
    args.in = dy.flat<T>().data();
    args.in_cols = geo.n;
    args.blocks = values_t;
    args.bi = geo.bw;
    args.bo = geo.bh;
    args.group_ptr = ctx->input(3).flat<int32_t>().data();
    args.ids = nullptr;
    args.in_block = ctx->input(2).flat<int32_t>().data();
    args.out = dx->flat<T>().data();
    args.out_cols = geo.k;
    OP_REQUIRES_OK(ctx, RunGroupedProduct(ctx, args, geo.nbr, geo.m, geo.nnzb));
  }
};

template <typename T>
class BsrMatmulValuesGradOp : public OpKernel {
 public:
  explicit BsrMatmulValuesGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BsrGeometry geo;
    OP_REQUIRES_OK(ctx, ValidateValuesGradInputs(ctx, &geo));
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    Tensor* dvalues = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(2).shape(), &dvalues));
    if (dvalues->NumElements() == 0) return;
    const std::vector<int32_t> block_row = BlockRows(ctx->input(4), geo);
    ValuesGradArgs<T> args;
    args.x = x.flat<T>().data();
    args.dy = dy.flat<T>().data();
    args.m = geo.m;
    args.k = geo.k;
    args.n = geo.n;
    args.bh = geo.bh;
    args.bw = geo.bw;
    args.block_row = block_row.data();
    args.col_indices = ctx->input(3).flat<int32_t>().data();
    args.dvalues = dvalues->flat<T>().data();
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    pool->ParallelFor(geo.nnzb, std::max<int64_t>(1, geo.m * geo.bh * geo.bw * 2),
                      [&](int64_t begin, int64_t end) {
                        BsrValuesGrad<T>(args, begin, end);
                      });
  }
};

}  // namespace

#define TFBS_REGISTER_CPU(T)                                                 \
  REGISTER_KERNEL_BUILDER(                                                   \
      Name("TfbsBsrMatmul").Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
      BsrMatmulOp<T>);                                                       \
  REGISTER_KERNEL_BUILDER(Name("TfbsBsrMatmulTransposed")                    \
                              .Device(DEVICE_CPU)                            \
                              .TypeConstraint<T>("T"),                       \
                          BsrMatmulTransposedOp<T>);                         \
  REGISTER_KERNEL_BUILDER(Name("TfbsBsrMatmulValuesGrad")                    \
                              .Device(DEVICE_CPU)                            \
                              .TypeConstraint<T>("T"),                       \
                          BsrMatmulValuesGradOp<T>);
TFBS_REGISTER_CPU(float)
TFBS_REGISTER_CPU(double)
#undef TFBS_REGISTER_CPU

}  // namespace tfbs
