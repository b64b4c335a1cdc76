// CPU OpKernels of the BSR matmul ops: validation (once per layout, through
// LayoutCache), the choice of ISA and kernel, and work splitting over
// TensorFlow's intra-op thread pool. The arithmetic is in
// bsr_matmul_cpu_kernels.cc, one copy per ISA.
#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "bsr_matmul_cpu_kernels.h"
#include "bsr_matmul_kernels.h"
#include "cpu_dispatch.h"
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

// Dense rows per work unit of the row-tile kernel: a multiple of every
// register tile height, and small enough that M = 256 still splits.
constexpr int64_t kRowsPerUnit = 48;

// Bytes of packed panels per work unit. Consecutive units share their panel
// chunk and stream the blocks of one group each, so the chunk should stay in
// a core's L2 (1-2 MB on current x86) with room for the blocks and the
// other thread's work: with K = 2048 floats that is 2 panels (32 rows with
// AVX-512). 256 kB rather than 512 measured 3-7 % faster for 4x4 blocks and
// at M = 64 on Zen 5 (1 MB L2), the same at M = 256 with 8x8..32x32 blocks.
constexpr int64_t kPanelChunkBytes = 256 << 10;
constexpr int64_t kMaxPanelsPerUnit = 8;

// ScatterProduct's single-thread rates (one Zen 5 core, blocks from L3)
// and the stream time from which it splits the block rows between threads.
constexpr int64_t kScatterBytesPerNs = 120;
constexpr int64_t kScatterMacsPerNs = 110;
constexpr int64_t kScatterParallelNs = 400000;

// ParallelFor's cost per unit is in CPU cycles (Eigen adds a thread per
// ~10^5 of them): the vector kernels do `lanes` multiply-adds per cycle and
// instruction, so counting flops split products that one thread does faster
// (M = 100, K = 128, N = 104, 4 x 4 at 10 %, AVX-512 on 2 cores: 35 us on
// two threads, 16 us on one).
int64_t VectorCycles(int64_t flops, int64_t lanes) {
  return std::max<int64_t>(1, flops / (2 * std::max<int64_t>(1, lanes)));
}

template <typename T>
::tensorflow::Status ActiveKernels(const CpuKernels<T>** kernels) {
  CpuIsa isa;
  std::string error;
  if (!ActiveCpuIsa(&isa, &error)) {
    return ::tensorflow::errors::FailedPrecondition(error);
  }
  *kernels = &MatmulKernelsFor<T>(isa);
  return ::tensorflow::Status();
}

// Runs the grouped product over the pool with the kernel the ISA's tile
// table picks. `args.in` is row-major [m, args.in_cols]; the strides and
// packing are set here. `transpose_blocks`: the row-tile kernel needs the
// blocks as [bi, bo] rows, so a transposed product copies them first.
template <typename T>
::tensorflow::Status RunGroupedProduct(OpKernelContext* ctx,
                                       const CpuKernels<T>& k,
                                       GroupedProductArgs<T> args,
                                       int64_t num_groups, int64_t nnzb,
                                       bool transposed) {
  const int64_t m = args.m;
  if (num_groups == 0 || m == 0) return ::tensorflow::Status();
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const ProductPlan plan = k.plan(m, args.bi, args.bo, transposed);
  const int64_t per_group = nnzb / num_groups + 1;
  if (plan.gather) {
    args.in_row_stride = args.in_cols;
    args.in_block_stride = args.bi;
    Tensor repeated;
    if (args.bi < plan.lanes) {  // block rows narrower than a vector
      const int64_t segs = (args.in_cols + args.bi - 1) / args.bi;
      TF_RETURN_IF_ERROR(ctx->allocate_temp(
          ::tensorflow::DataTypeToEnum<T>::value,
          TensorShape({m * segs * plan.lanes}), &repeated));
      T* dst = repeated.flat<T>().data();
      k.repeat_segments(args.in, m, args.in_cols, args.bi, plan.lanes, dst);
      args.in = dst;
      args.in_row_stride = plan.lanes;
      args.in_block_stride = m * plan.lanes;
    }
    const int64_t cost =
        VectorCycles(m * per_group * args.bi * args.bo * 2, plan.lanes);
    pool->ParallelFor(num_groups, cost, [&](int64_t begin, int64_t end) {
      k.gather_product(args, begin, end);
    });
    return ::tensorflow::Status();
  }
  if (plan.panels) {
    const int64_t lanes = plan.lanes;
    const int64_t nq = (m + lanes - 1) / lanes;
    Tensor packed;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                          TensorShape({nq * args.in_cols * lanes}),
                                          &packed));
    T* dst = packed.flat<T>().data();
    const T* src = args.in;
    const int64_t cols = args.in_cols;
    pool->ParallelFor(nq, cols * lanes * 2, [&](int64_t begin, int64_t end) {
      k.pack_panels(src, m, cols, dst, begin, end);
    });
    args.in = dst;
    const int64_t panel_bytes = cols * lanes * static_cast<int64_t>(sizeof(T));
    int64_t per_unit = std::max<int64_t>(
        1, std::min(kMaxPanelsPerUnit, kPanelChunkBytes / panel_bytes));
    // Whole register tiles per unit where the budget allows one: 4 panels
    // with 3-panel tiles would leave a tail tile in every unit.
    if (per_unit >= plan.tile_panels) per_unit -= per_unit % plan.tile_panels;
    const int64_t chunks = (nq + per_unit - 1) / per_unit;
    const int64_t rows = std::min(nq, per_unit) * lanes;
    const int64_t cost =
        VectorCycles(rows * per_group * args.bi * args.bo * 2, lanes);
    pool->ParallelFor(num_groups * chunks, cost, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t g = u % num_groups;
        const int64_t q0 = (u / num_groups) * per_unit;
        k.panel_product(args, g, g + 1, q0, std::min(nq, q0 + per_unit));
      }
    });
    return ::tensorflow::Status();
  }
  Tensor values_t;
  if (transposed) {
    // Stored [bo, bi] blocks read as [bi, bo]: copy them transposed.
    TF_RETURN_IF_ERROR(ctx->allocate_temp(::tensorflow::DataTypeToEnum<T>::value,
                                          TensorShape({nnzb * args.block_elems}),
                                          &values_t));
    T* out = values_t.flat<T>().data();
    const T* blocks = args.blocks;
    const int64_t bh = args.bo, bw = args.bi;
    pool->ParallelFor(nnzb, bh * bw * 2, [&](int64_t begin, int64_t end) {
      k.transpose_blocks(blocks, bh, bw, out, begin, end);
    });
    args.blocks = out;
    args.w_row = args.bo;
    args.w_col = 1;
  }
  args.in_row_stride = args.in_cols;
  args.in_block_stride = args.bi;
  Tensor packed;
  if (plan.pack_rows) {
    const int64_t in_blocks = (args.in_cols + args.bi - 1) / args.bi;
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        ::tensorflow::DataTypeToEnum<T>::value,
        TensorShape({in_blocks * m * args.bi}), &packed));
    T* dst = packed.flat<T>().data();
    const T* src = args.in;
    const int64_t cols = args.in_cols, bi = args.bi;
    pool->ParallelFor(in_blocks, m * bi, [&](int64_t begin, int64_t end) {
      k.pack_block_columns(src, m, cols, bi, dst, begin, end);
    });
    args.in = dst;
    args.in_row_stride = bi;
    args.in_block_stride = m * bi;
  }
  const int64_t row_chunks = (m + kRowsPerUnit - 1) / kRowsPerUnit;
  const int64_t rows = std::min(m, kRowsPerUnit);
  const int64_t cost =
      std::max<int64_t>(1, rows * per_group * args.bi * args.bo * 2);
  pool->ParallelFor(num_groups * row_chunks, cost,
                    [&](int64_t begin, int64_t end) {
                      for (int64_t u = begin; u < end; ++u) {
                        const int64_t g = u / row_chunks;
                        const int64_t c = u % row_chunks;
                        const int64_t m0 = c * kRowsPerUnit;
                        const int64_t m1 = std::min(m, m0 + kRowsPerUnit);
                        k.row_product(args, g, g + 1, m0, m1);
                      }
                    });
  return ::tensorflow::Status();
}

// x @ W in storage order (plan.scatter: a few dense rows). The threads take
// ranges of block rows holding about equal numbers of blocks, each adding
// into its own zeroed [m, nbc * bw] slice (two block rows may write the same
// columns); the slices are then summed into y, clipped to n columns.
template <typename T>
::tensorflow::Status RunScatterProduct(OpKernelContext* ctx,
                                       const CpuKernels<T>& k,
                                       const BsrLayout& layout, int64_t m,
                                       const T* x, const T* blocks, T* y) {
  BsrGeometry geo = layout.geo;
  geo.m = m;  // not part of the cached layout
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  // One thread unless the blocks take longer to stream than a second
  // thread's start and the partial sums cost. Measured on 2 Zen 5 vCPUs,
  // one thread was faster in every case tried: 2048^2 at 90 % (blocks 4x4
  // to 32x32, M = 1..4) in 0.42-0.76x the time of two, 50 % at M = 4 in
  // 0.79x, and even 4096^2 at 50 % (0.6-0.8 ms) took 0.90-1.01x.
  const int64_t work = geo.nnzb * geo.bh * geo.bw * geo.m;
  const int64_t stream_ns = std::max(
      geo.nnzb * geo.bh * geo.bw * static_cast<int64_t>(sizeof(T)) /
          kScatterBytesPerNs,
      work / kScatterMacsPerNs);
  const int64_t shards =
      stream_ns < kScatterParallelNs
          ? 1
          : std::max<int64_t>(1, std::min<int64_t>({workers->num_threads,
                                                    geo.nbr}));
  const int64_t stride = geo.nbc * geo.bw;
  Tensor partial;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(
      ::tensorflow::DataTypeToEnum<T>::value,
      TensorShape({shards * geo.m * stride}), &partial));
  T* part = partial.flat<T>().data();
  std::fill_n(part, shards * geo.m * stride, T(0));
  const int32_t* row_ptr = layout.row_ptr.data();
  // Shard s starts at the first block row holding block s * nnzb / shards.
  std::vector<int64_t> first(shards + 1, geo.nbr);
  for (int64_t s = 0; s < shards; ++s) {
    const int64_t target = s * geo.nnzb / shards;
    first[s] = std::upper_bound(row_ptr, row_ptr + geo.nbr + 1, target) -
               row_ptr - 1;
  }
  first[0] = 0;
  ScatterArgs<T> args;
  args.in = x;
  args.m = geo.m;
  args.k = geo.k;
  args.bh = geo.bh;
  args.bw = geo.bw;
  args.blocks = blocks;
  args.row_ptr = row_ptr;
  args.col_indices = layout.col_indices.data();
  args.out_stride = stride;
  auto run = [&](int64_t s) {
    ScatterArgs<T> a = args;
    a.out = part + s * geo.m * stride;
    k.scatter_product(a, first[s], std::max(first[s], first[s + 1]));
  };
  if (shards == 1) {
    run(0);
  } else {
    workers->workers->ParallelFor(
        shards, /*cost_per_unit=*/1 << 24,
        [&](int64_t begin, int64_t end) {
          for (int64_t s = begin; s < end; ++s) run(s);
        });
  }
  for (int64_t r = 0; r < geo.m; ++r) {
    T* out = y + r * geo.n;
    const T* src = part + r * stride;
    std::copy(src, src + geo.n, out);
    for (int64_t s = 1; s < shards; ++s) {
      const T* add = part + (s * geo.m + r) * stride;
      for (int64_t c = 0; c < geo.n; ++c) out[c] += add[c];
    }
  }
  return ::tensorflow::Status();
}

template <typename T>
class BsrMatmulOp : public OpKernel {
 public:
  explicit BsrMatmulOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const BsrLayout> layout;
    OP_REQUIRES_OK(ctx, layouts_.Get(ctx, 1, &layout));
    BsrGeometry geo = layout->geo;
    const Tensor& x = ctx->input(0);
    OP_REQUIRES_OK(ctx, ValidateDense(x, "x", geo.k, "K"));
    geo.m = x.dim_size(0);
    const CpuKernels<T>* k = nullptr;
    OP_REQUIRES_OK(ctx, ActiveKernels<T>(&k));
    TensorShape y_shape;
    OP_REQUIRES_OK(ctx, MakeOutputShape({geo.m, geo.n}, "y", &y_shape));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
    if (y->NumElements() == 0) return;
    if (geo.nnzb == 0 || geo.k == 0) {
      std::fill_n(y->flat<T>().data(), y->NumElements(), T(0));
      return;
    }
    if (k->plan(geo.m, geo.bh, geo.bw, /*transposed=*/false).scatter) {
      OP_REQUIRES_OK(ctx, RunScatterProduct(ctx, *k, *layout, geo.m,
                                            x.flat<T>().data(),
                                            ctx->input(1).flat<T>().data(),
                                            y->flat<T>().data()));
      return;
    }
    const BsrColumnIndex& index = layout->ColumnIndex();
    GroupedProductArgs<T> args;
    args.in = x.flat<T>().data();
    args.m = geo.m;
    args.in_cols = geo.k;
    args.blocks = ctx->input(1).flat<T>().data();
    args.bi = geo.bh;
    args.bo = geo.bw;
    args.block_elems = geo.bh * geo.bw;
    args.w_row = geo.bw;
    args.w_col = 1;
    args.group_ptr = index.col_ptr.data();
    args.ids = index.block_ids.data();
    args.in_block = index.block_rows.data();
    args.out = y->flat<T>().data();
    args.out_cols = geo.n;
    OP_REQUIRES_OK(ctx, RunGroupedProduct(ctx, *k, args, geo.nbc, geo.nnzb,
                                          /*transposed=*/false));
  }

 private:
  LayoutCache layouts_;
};

template <typename T>
class BsrMatmulTransposedOp : public OpKernel {
 public:
  explicit BsrMatmulTransposedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const BsrLayout> layout;
    OP_REQUIRES_OK(ctx, layouts_.Get(ctx, 1, &layout));
    BsrGeometry geo = layout->geo;
    const Tensor& dy = ctx->input(0);
    OP_REQUIRES_OK(ctx, ValidateDense(dy, "dy", geo.n, "N"));
    geo.m = dy.dim_size(0);
    const CpuKernels<T>* k = nullptr;
    OP_REQUIRES_OK(ctx, ActiveKernels<T>(&k));
    TensorShape dx_shape;
    OP_REQUIRES_OK(ctx, MakeOutputShape({geo.m, geo.k}, "dx", &dx_shape));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dx_shape, &dx));
    if (dx->NumElements() == 0) return;
    if (geo.nnzb == 0 || geo.n == 0) {
      std::fill_n(dx->flat<T>().data(), dx->NumElements(), T(0));
      return;
    }
    // Grouped by block row of W, each stored [bh, bw] block read as its
    // transpose [bw, bh].
    GroupedProductArgs<T> args;
    args.in = dy.flat<T>().data();
    args.m = geo.m;
    args.in_cols = geo.n;
    args.blocks = ctx->input(1).flat<T>().data();
    args.bi = geo.bw;
    args.bo = geo.bh;
    args.block_elems = geo.bh * geo.bw;
    args.w_row = 1;
    args.w_col = geo.bw;
    args.group_ptr = layout->row_ptr.data();
    args.ids = nullptr;
    args.in_block = layout->col_indices.data();
    args.out = dx->flat<T>().data();
    args.out_cols = geo.k;
    OP_REQUIRES_OK(ctx, RunGroupedProduct(ctx, *k, args, geo.nbr, geo.nnzb,
                                          /*transposed=*/true));
  }

 private:
  LayoutCache layouts_;
};

template <typename T>
class BsrMatmulValuesGradOp : public OpKernel {
 public:
  explicit BsrMatmulValuesGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const BsrLayout> layout;
    OP_REQUIRES_OK(ctx, layouts_.Get(ctx, 2, &layout));
    BsrGeometry geo = layout->geo;
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    OP_REQUIRES_OK(ctx, ValidateDense(x, "x", geo.k, "K"));
    OP_REQUIRES_OK(ctx, ValidateDense(dy, "dy", geo.n, "N"));
    OP_REQUIRES(ctx, x.dim_size(0) == dy.dim_size(0),
                ::tensorflow::errors::InvalidArgument(
                    "x and dy must have the same number of rows, got ",
                    x.dim_size(0), " and ", dy.dim_size(0)));
    geo.m = x.dim_size(0);
    const CpuKernels<T>* k = nullptr;
    OP_REQUIRES_OK(ctx, ActiveKernels<T>(&k));
    Tensor* dvalues = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(2).shape(), &dvalues));
    if (dvalues->NumElements() == 0) return;
    ValuesGradArgs<T> args;
    args.x = x.flat<T>().data();
    args.dy = dy.flat<T>().data();
    args.m = geo.m;
    args.k = geo.k;
    args.n = geo.n;
    args.bh = geo.bh;
    args.bw = geo.bw;
    args.block_row = layout->block_rows.data();
    args.col_indices = layout->col_indices.data();
    args.dvalues = dvalues->flat<T>().data();
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    // A cost estimate only: saturate rather than overflow.
    int64_t cost = 2;
    if (!CheckedMul(cost, geo.m, &cost) || !CheckedMul(cost, geo.bh, &cost) ||
        !CheckedMul(cost, geo.bw, &cost)) {
      cost = std::numeric_limits<int64_t>::max();
    }
    pool->ParallelFor(geo.nnzb, std::max<int64_t>(1, cost),
                      [&](int64_t begin, int64_t end) {
                        k->values_grad(args, begin, end);
                      });
  }

 private:
  LayoutCache layouts_;
};

// Which ISA the CPU kernels use, and why (JSON).
class KernelInfoOp : public OpKernel {
 public:
  explicit KernelInfoOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<::tensorflow::tstring>()() = CpuKernelInfoJson();
  }
};

class SetKernelIsaOp : public OpKernel {
 public:
  explicit SetKernelIsaOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& isa = ctx->input(0);
    OP_REQUIRES(ctx, isa.dims() == 0,
                ::tensorflow::errors::InvalidArgument(
                    "isa must be a scalar string, got shape ",
                    isa.shape().DebugString()));
    const std::string error = SelectCpuIsa(isa.scalar<::tensorflow::tstring>()());
    OP_REQUIRES(ctx, error.empty(), ::tensorflow::errors::InvalidArgument(error));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<::tensorflow::tstring>()() = CpuKernelInfoJson();
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

REGISTER_KERNEL_BUILDER(Name("TfbsKernelInfo").Device(DEVICE_CPU), KernelInfoOp);
REGISTER_KERNEL_BUILDER(Name("TfbsSetKernelIsa").Device(DEVICE_CPU),
                        SetKernelIsaOp);

}  // namespace tfbs
