// GPU OpKernels of the BSR matmul ops. The block structure (col_indices,
// row_ptr, dense_shape) is kept in host memory: it is validated there with
// the same code as on the CPU, indexed, and the few KB of indices are copied
// to the device with the call; the dense operands and values stay on the GPU.
#if GOOGLE_CUDA

#include <vector>

#include "bsr_matmul_gpu_kernels.h"
#include "bsr_matmul_kernels.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "xla/stream_executor/device_memory.h"
#include "xla/stream_executor/stream.h"

namespace tfbs {

using ::tensorflow::DEVICE_GPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::Internal;

namespace {

void* CudaStream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream()->platform_specific_handle().stream;
}

// Copies host int32 arrays into one device buffer; returns device pointers.
Status UploadIndices(OpKernelContext* ctx,
                     const std::vector<const std::vector<int32_t>*>& parts,
                     Tensor* buffer, std::vector<const int32_t*>* device_ptrs) {
  int64_t total = 0;
  for (const auto* p : parts) total += static_cast<int64_t>(p->size());
  TF_RETURN_IF_ERROR(ctx->allocate_temp(::tensorflow::DT_INT32,
                                        TensorShape({std::max<int64_t>(total, 1)}),
                                        buffer));
  int32_t* base = buffer->flat<int32_t>().data();
  auto* stream = ctx->op_device_context()->stream();
  int64_t offset = 0;
  for (const auto* p : parts) {
    device_ptrs->push_back(base + offset);
    if (!p->empty()) {
      stream_executor::DeviceMemoryBase dst(base + offset, p->size() * sizeof(int32_t));
      TF_RETURN_IF_ERROR(stream->Memcpy(&dst, p->data(), p->size() * sizeof(int32_t)));
    }
    offset += static_cast<int64_t>(p->size());
  }
  return Status();
}

Status CheckLaunch(int code, const char* what) {
  constexpr int kInvalidConfiguration = 9;  // cudaErrorInvalidConfiguration
  if (code == kInvalidConfiguration) {
    return ::tensorflow::errors::InvalidArgument(
        what, ": block shape or batch too large for the GPU kernel (blocks at "
        "most 256 wide and 40 KB, at most 65535 row tiles); run it on the CPU");
  }
  if (code != 0) return Internal(what, " failed to launch: CUDA error ", code);
  return Status();
}

std::vector<int32_t> HostVector(const Tensor& t) {
  const auto flat = t.flat<int32_t>();
  return std::vector<int32_t>(flat.data(), flat.data() + flat.size());
}

template <typename T>
class BsrMatmulGpuOp : public OpKernel {
 public:
  explicit BsrMatmulGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BsrGeometry geo;
    OP_REQUIRES_OK(ctx, ValidateProductInputs(ctx, /*transposed=*/false, &geo));
    const Tensor& x = ctx->input(0);
    TensorShape y_shape;
    OP_REQUIRES_OK(ctx, MakeOutputShape({geo.m, geo.n}, "y", &y_shape));
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
    if (y->NumElements() == 0) return;
    BsrColumnIndex index;
    BuildColumnIndex(geo, ctx->input(2).flat<int32_t>().data(),
                     ctx->input(3).flat<int32_t>().data(), &index);
    Tensor buffer;
    std::vector<const int32_t*> dev;
    OP_REQUIRES_OK(ctx, UploadIndices(ctx, {&index.col_ptr, &index.block_ids,
                                            &index.block_rows}, &buffer, &dev));
    gpu::GroupedProductArgs<T> args;
    args.in = x.flat<T>().data();
    args.in_cols = geo.k;
    args.blocks = ctx->input(1).flat<T>().data();
    args.bi = static_cast<int>(geo.bh);
    args.bo = static_cast<int>(geo.bw);
    args.group_ptr = dev[0];
    args.ids = dev[1];
    args.in_block = dev[2];
    args.out = y->flat<T>().data();
    args.out_cols = geo.n;
    OP_REQUIRES_OK(ctx, CheckLaunch(gpu::LaunchGroupedProduct<T>(
                                        args, geo.nbc, geo.m, CudaStream(ctx)),
                                    "TfbsBsrMatmul"));
  }
};

template <typename T>
class BsrMatmulTransposedGpuOp : public OpKernel {
 public:
  explicit BsrMatmulTransposedGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BsrGeometry geo;
    OP_REQUIRES_OK(ctx, ValidateProductInputs(ctx, /*transposed=*/true, &geo));
    const Tensor& dy = ctx->input(0);
    TensorShape dx_shape;
    OP_REQUIRES_OK(ctx, MakeOutputShape({geo.m, geo.k}, "dx", &dx_shape));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dx_shape, &dx));
    if (dx->NumElements() == 0) return;
    const std::vector<int32_t> row_ptr = HostVector(ctx->input(3));
    const std::vector<int32_t> cols = HostVector(ctx->input(2));
    Tensor buffer, transposed;
    std::vector<const int32_t*> dev;
    OP_REQUIRES_OK(ctx, UploadIndices(ctx, {&row_ptr, &cols}, &buffer, &dev));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(ctx->input(1).dtype(),
                                           ctx->input(1).shape(), &transposed));
    void* stream = CudaStream(ctx);
    OP_REQUIRES_OK(ctx, CheckLaunch(gpu::LaunchTransposeBlocks<T>(
                                        ctx->input(1).flat<T>().data(),
                                        static_cast<int>(geo.bh),
                                        static_cast<int>(geo.bw), geo.nnzb,
                                        transposed.flat<T>().data(), stream),
                                    "TransposeBlocks"));
    gpu::GroupedProductArgs<T> args;
    args.in = dy.flat<T>().data();
    args.in_cols = geo.n;
    args.blocks = transposed.flat<T>().data();
    args.bi = static_cast<int>(geo.bw);
    args.bo = static_cast<int>(geo.bh);
    args.group_ptr = dev[0];
    args.ids = nullptr;
    args.in_block = dev[1];
    args.out = dx->flat<T>().data();
    args.out_cols = geo.k;
    OP_REQUIRES_OK(ctx, CheckLaunch(gpu::LaunchGroupedProduct<T>(
                                        args, geo.nbr, geo.m, stream),
                                    "TfbsBsrMatmulTransposed"));
  }
};

template <typename T>
class BsrMatmulValuesGradGpuOp : public OpKernel {
 public:
  explicit BsrMatmulValuesGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    BsrGeometry geo;
    OP_REQUIRES_OK(ctx, ValidateValuesGradInputs(ctx, &geo));
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    Tensor* dvalues = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(2).shape(), &dvalues));
    if (dvalues->NumElements() == 0) return;
    const std::vector<int32_t> block_row = BlockRows(ctx->input(4), geo);
    const std::vector<int32_t> cols = HostVector(ctx->input(3));
    Tensor buffer;
    std::vector<const int32_t*> dev;
    OP_REQUIRES_OK(ctx, UploadIndices(ctx, {&block_row, &cols}, &buffer, &dev));
    OP_REQUIRES_OK(ctx, CheckLaunch(gpu::LaunchValuesGrad<T>(
                                        x.flat<T>().data(), dy.flat<T>().data(),
                                        x.dim_size(0), geo.k, geo.n,
                                        static_cast<int>(geo.bh),
                                        static_cast<int>(geo.bw), dev[0], dev[1],
                                        geo.nnzb, dvalues->flat<T>().data(),
                                        CudaStream(ctx)),
                                    "TfbsBsrMatmulValuesGrad"));
  }
};

}  // namespace

#define TFBS_REGISTER_GPU(T)                                                  \
  REGISTER_KERNEL_BUILDER(Name("TfbsBsrMatmul")                               \
                              .Device(DEVICE_GPU)                             \
                              .TypeConstraint<T>("T")                         \
                              .HostMemory("col_indices")                      \
                              .HostMemory("row_ptr")                          \
                              .HostMemory("dense_shape"),                     \
                          BsrMatmulGpuOp<T>);                                 \
  REGISTER_KERNEL_BUILDER(Name("TfbsBsrMatmulTransposed")                     \
                              .Device(DEVICE_GPU)                             \
                              .TypeConstraint<T>("T")                         \
                              .HostMemory("col_indices")                      \
                              .HostMemory("row_ptr")                          \
                              .HostMemory("dense_shape"),                     \
                          BsrMatmulTransposedGpuOp<T>);                       \
  REGISTER_KERNEL_BUILDER(Name("TfbsBsrMatmulValuesGrad")                     \
                              .Device(DEVICE_GPU)                             \
                              .TypeConstraint<T>("T")                         \
                              .HostMemory("col_indices")                      \
                              .HostMemory("row_ptr")                          \
                              .HostMemory("dense_shape"),                     \
                          BsrMatmulValuesGradGpuOp<T>);
TFBS_REGISTER_GPU(float)
TFBS_REGISTER_GPU(double)
#undef TFBS_REGISTER_GPU

}  // namespace tfbs

#endif  // GOOGLE_CUDA
