// Op registrations of the BSR matmul family. Only the interface lives here;
// the CPU kernels are in bsr_matmul_kernels.cc, the GPU ones in
// bsr_matmul_kernels_gpu.cc, so a GPU build can add kernels to ops that a
// CPU-only library already registered.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbs {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Output [rows of input 0, dense_shape[dim]]; dense_shape is input 4 of the
// products, so a constant shape gives a fully static output.
Status ProductShape(InferenceContext* c, int dense_dim) {
  ShapeHandle x, values, dense_shape;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &values));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &dense_shape));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &dense_shape));
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(4, &dense_shape));
  TF_RETURN_IF_ERROR(c->WithRank(dense_shape, 2, &dense_shape));
  c->set_output(0, c->Matrix(c->Dim(x, 0), c->Dim(dense_shape, dense_dim)));
  return Status();
}

}  // namespace

REGISTER_OP("TfbsBsrMatmul")
    .Input("x: T")
    .Input("values: T")
    .Input("col_indices: int32")
    .Input("row_ptr: int32")
    .Input("dense_shape: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) { return ProductShape(c, 1); })
    .Doc(R"doc(
y = x @ W for dense x [M, K] and W [K, N] in block compressed sparse row form:
values [nnzb, bh, bw], col_indices [nnzb], row_ptr [ceil(K / bh) + 1],
dense_shape [K, N]. Edge blocks are zero padded.
)doc");

REGISTER_OP("TfbsBsrMatmulTransposed")
    .Input("dy: T")
    .Input("values: T")
    .Input("col_indices: int32")
    .Input("row_ptr: int32")
    .Input("dense_shape: int64")
    .Output("dx: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) { return ProductShape(c, 0); })
    .Doc(R"doc(
dx = dy @ W^T for dense dy [M, N] and W [K, N] in BSR form (the gradient of
TfbsBsrMatmul with respect to x).
)doc");

REGISTER_OP("TfbsBsrMatmulValuesGrad")
    .Input("x: T")
    .Input("dy: T")
    .Input("values: T")
    .Input("col_indices: int32")
    .Input("row_ptr: int32")
    .Input("dense_shape: int64")
    .Output("dvalues: T")
    .Attr("T: {float, double}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &unused));
      c->set_output(0, c->input(2));
      return Status();
    })
    .Doc(R"doc(
dvalues[p] = x[:, rows of block p]^T @ dy[:, columns of block p]: the gradient
of TfbsBsrMatmul with respect to the block values, layout unchanged.
)doc");

}  // namespace tfbs

namespace tfbs {

// Stateful so that they run at every call and are never constant folded.
REGISTER_OP("TfbsKernelInfo")
    .Output("info: string")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
JSON: the CPU instruction set the kernels use, why, the ISAs built and
supported, what each missing one lacks, and the CPU features seen.
)doc");

REGISTER_OP("TfbsSetKernelIsa")
    .Input("isa: string")
    .Output("info: string")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
Forces the CPU kernels' instruction set for the whole process: 'baseline',
'avx2', 'avx512', or 'auto' (the widest the CPU supports). Fails, naming
what the CPU lacks, when it cannot run here. Returns TfbsKernelInfo's JSON.
)doc");

}  // namespace tfbs
