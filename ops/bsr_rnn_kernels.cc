// CPU OpKernels of the fused block-sparse recurrences: input validation,
// the column index of the recurrent matrix, and TensorFlow's intra-op
// thread pool handed to the time loop in bsr_rnn_cpu_kernels.cc.
#include <memory>
#include <string>

#include "bsr_matmul_kernels.h"
#include "bsr_rnn_cpu_kernels.h"
#include "bsr_structure.h"
#include "cpu_dispatch.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tfbs {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;

namespace {

// Input positions of each op.
struct Inputs {
  int x_proj = 0, h0 = 1, c0 = -1, mask = 2, bias = -1, bsr = 3;
};

Inputs InputsOf(RnnCell cell) {
  Inputs in;
  if (cell == RnnCell::kLstm) {
    in.c0 = 2;
    in.mask = 3;
    in.bsr = 4;
  } else if (cell == RnnCell::kGru) {
    in.bias = 3;
    in.bsr = 4;
  }
  return in;
}

Status ParseActivationAttr(OpKernelConstruction* ctx, const char* attr,
                           Activation* out) {
  std::string name;
  TF_RETURN_IF_ERROR(ctx->GetAttr(attr, &name));
  if (!ParseActivation(name, out)) {
    return InvalidArgument(attr, " '", name,
                           "' has no fused kernel; use one of tanh, sigmoid, "
                           "relu, linear, hard_sigmoid");
  }
  return Status();
}

template <typename T, RnnCell kCell>
class BsrRnnSequenceOp : public OpKernel {
 public:
  explicit BsrRnnSequenceOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseActivationAttr(ctx, "activation", &activation_));
    if (kCell != RnnCell::kSimple) {
      OP_REQUIRES_OK(ctx, ParseActivationAttr(ctx, "recurrent_activation",
                                              &recurrent_activation_));
    }
    if (kCell == RnnCell::kGru) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("reset_after", &reset_after_));
    }
    OP_REQUIRES_OK(ctx, ctx->GetAttr("go_backwards", &go_backwards_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("zero_output_for_mask",
                                     &zero_output_for_mask_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Inputs in = InputsOf(kCell);
    const int64_t gates = NumGates(kCell);
    const Tensor& x = ctx->input(in.x_proj);
    const Tensor& h0 = ctx->input(in.h0);
    OP_REQUIRES(ctx, x.dims() == 3,
                InvalidArgument("x_proj must have rank 3 [batch, time, ",
                                gates, " * units], got shape ",
                                x.shape().DebugString()));
    OP_REQUIRES(ctx, h0.dims() == 2,
                InvalidArgument("initial state h0 must have rank 2 [batch, "
                                "units], got shape ",
                                h0.shape().DebugString()));
    const int64_t batch = x.dim_size(0), time = x.dim_size(1);
    const int64_t units = h0.dim_size(1);
    OP_REQUIRES(ctx, h0.dim_size(0) == batch,
                InvalidArgument("initial state h0 has batch size ",
                                h0.dim_size(0), " but x_proj has ", batch));
    // Bounds units (the recurrent matrix has the same bound) before
    // gates * units is computed.
    OP_REQUIRES(ctx, units <= kMaxDimension,
                InvalidArgument("initial state h0 has ", units,
                                " units, more than the ", kMaxDimension,
                                " supported"));
    OP_REQUIRES(ctx, x.dim_size(2) == gates * units,
                InvalidArgument("x_proj has ", x.dim_size(2), " columns but ",
                                gates, " gates of ", units, " units need ",
                                gates * units));
    if (in.c0 >= 0) {
      const Tensor& c0 = ctx->input(in.c0);
      OP_REQUIRES(ctx, c0.shape() == h0.shape(),
                  InvalidArgument("initial state c0 must have the shape of h0 ",
                                  h0.shape().DebugString(), ", got ",
                                  c0.shape().DebugString()));
    }
    const Tensor& mask = ctx->input(in.mask);
    const bool has_mask = mask.NumElements() > 0 || mask.dims() != 1;
    if (has_mask) {
      OP_REQUIRES(ctx,
                  mask.dims() == 2 && mask.dim_size(0) == batch &&
                      mask.dim_size(1) == time,
                  InvalidArgument("mask must have shape [batch, time] = [",
                                  batch, ", ", time, "] or be empty, got ",
                                  mask.shape().DebugString()));
    }
    const T* bias = nullptr;
    if (in.bias >= 0) {
      const Tensor& b = ctx->input(in.bias);
      if (b.NumElements() > 0 || b.dims() != 1) {
        OP_REQUIRES(ctx, b.dims() == 1 && b.dim_size(0) == gates * units,
                    InvalidArgument("recurrent_bias must have shape [",
                                    gates * units, "] or be empty, got ",
                                    b.shape().DebugString()));
        bias = b.flat<T>().data();
      }
    }
    std::shared_ptr<const BsrLayout> layout;
    OP_REQUIRES_OK(ctx, layouts_.Get(ctx, in.bsr, &layout));
    const BsrGeometry& geo = layout->geo;
    CpuIsa isa;
    std::string isa_error;
    OP_REQUIRES(ctx, ActiveCpuIsa(&isa, &isa_error),
                ::tensorflow::errors::FailedPrecondition(isa_error));
    OP_REQUIRES(ctx, geo.k == units && geo.n == gates * units,
                InvalidArgument("the recurrent matrix must be [units, ", gates,
                                " * units] = [", units, ", ", gates * units,
                                "], got [", geo.k, ", ", geo.n, "]"));

    TensorShape outputs_shape;
    OP_REQUIRES_OK(ctx, MakeOutputShape({batch, time, units}, "outputs",
                                        &outputs_shape));
    Tensor* outputs = nullptr;
    Tensor* h = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, outputs_shape, &outputs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, h0.shape(), &h));
    Tensor* c = nullptr;
    if (in.c0 >= 0) {
      OP_REQUIRES_OK(ctx, ctx->allocate_output(2, h0.shape(), &c));
    }
    if (batch == 0 || units == 0) return;

    const BsrColumnIndex& index = layout->ColumnIndex();

    RnnSequenceArgs<T> args;
    args.cell = kCell;
    args.batch = batch;
    args.time = time;
    args.units = units;
    args.x_proj = x.flat<T>().data();
    args.h0 = h0.flat<T>().data();
    if (in.c0 >= 0) {
      args.c0 = ctx->input(in.c0).flat<T>().data();
      args.c_out = c->flat<T>().data();
    }
    if (has_mask) {
      args.mask = reinterpret_cast<const uint8_t*>(mask.flat<bool>().data());
    }
    args.recurrent_bias = bias;
    args.blocks = ctx->input(in.bsr).flat<T>().data();
    args.bh = geo.bh;
    args.bw = geo.bw;
    args.nbc = geo.nbc;
    args.col_ptr = index.col_ptr.data();
    args.block_ids = index.block_ids.data();
    args.block_rows = index.block_rows.data();
    args.activation = activation_;
    args.recurrent_activation = recurrent_activation_;
    args.reset_after = reset_after_;
    args.go_backwards = go_backwards_;
    args.zero_output_for_mask = zero_output_for_mask_;
    args.outputs = outputs->flat<T>().data();
    args.h_out = h->flat<T>().data();

    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    ParallelFor parallel_for =
        [pool](int64_t n, int64_t cost,
               const std::function<void(int64_t, int64_t)>& fn) {
          if (n <= 0) return;
          pool->ParallelFor(n, cost, fn);
        };
    RunRnnSequenceOn<T>(isa, args, parallel_for);
  }

 private:
  LayoutCache layouts_;
  Activation activation_ = Activation::kTanh;
  Activation recurrent_activation_ = Activation::kSigmoid;
  bool reset_after_ = true;
  bool go_backwards_ = false;
  bool zero_output_for_mask_ = false;
};

}  // namespace

#define TFBS_REGISTER_CPU(T)                                                \
  REGISTER_KERNEL_BUILDER(                                                  \
      Name("TfbsBsrLstmSequence").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      BsrRnnSequenceOp<T, RnnCell::kLstm>);                                 \
  REGISTER_KERNEL_BUILDER(                                                  \
      Name("TfbsBsrGruSequence").Device(DEVICE_CPU).TypeConstraint<T>("T"),  \
      BsrRnnSequenceOp<T, RnnCell::kGru>);                                  \
  REGISTER_KERNEL_BUILDER(Name("TfbsBsrSimpleRnnSequence")                  \
                              .Device(DEVICE_CPU)                           \
                              .TypeConstraint<T>("T"),                      \
                          BsrRnnSequenceOp<T, RnnCell::kSimple>);
TFBS_REGISTER_CPU(float)
TFBS_REGISTER_CPU(double)
#undef TFBS_REGISTER_CPU

}  // namespace tfbs
