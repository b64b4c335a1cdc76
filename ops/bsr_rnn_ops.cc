// Op registrations of the fused block-sparse recurrences. The CPU kernels
// are in bsr_rnn_kernels.cc, the arithmetic in bsr_rnn_cpu_kernels.cc.
//
// Every op takes the input projection of all timesteps (x @ W + bias,
// computed before the op as one matmul) and the recurrent matrix
// U [units, gates * units] in BSR form, in the Keras gate order, and runs
// the whole sequence.
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfbs {

using ::tensorflow::Status;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// outputs [batch, time, units] and the state(s) [batch, units]; units comes
// from h0 (the op checks it against the projection and the matrix).
Status SequenceShape(InferenceContext* c, int num_states) {
  ShapeHandle x, h0, unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &x));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &h0));
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(h0, 0), &batch));
  const DimensionHandle units = c->Dim(h0, 1);
  c->set_output(0, c->MakeShape({batch, c->Dim(x, 1), units}));
  for (int i = 0; i < num_states; ++i) {
    c->set_output(1 + i, c->Matrix(batch, units));
  }
  return Status();
}

}  // namespace

#define TFBS_SEQUENCE_ATTRS                                               \
  .Attr("T: {float, double}")                                             \
      .Attr("activation: string = 'tanh'")                                \
      .Attr("go_backwards: bool = false")                                 \
      .Attr("zero_output_for_mask: bool = false")

REGISTER_OP("TfbsBsrLstmSequence")
    .Input("x_proj: T")
    .Input("h0: T")
    .Input("c0: T")
    .Input("mask: bool")
    .Input("values: T")
    .Input("col_indices: int32")
    .Input("row_ptr: int32")
    .Input("dense_shape: int64")
    .Output("outputs: T")
    .Output("h: T")
    .Output("c: T")
    TFBS_SEQUENCE_ATTRS
    .Attr("recurrent_activation: string = 'sigmoid'")
    .SetShapeFn([](InferenceContext* c) { return SequenceShape(c, 2); })
    .Doc(R"doc(
LSTM over a whole sequence with a block-sparse recurrent matrix.

x_proj: [batch, time, 4 * units], x @ W + bias for every step (gates i, f, c, o).
h0, c0: [batch, units] initial states.
mask: [batch, time] (a masked step keeps the states), or an empty vector.
values, col_indices, row_ptr, dense_shape: U [units, 4 * units] in BSR form.
outputs: [batch, time, units] in processing order (reversed if go_backwards).
)doc");

REGISTER_OP("TfbsBsrGruSequence")
    .Input("x_proj: T")
    .Input("h0: T")
    .Input("mask: bool")
    .Input("recurrent_bias: T")
    .Input("values: T")
    .Input("col_indices: int32")
    .Input("row_ptr: int32")
    .Input("dense_shape: int64")
    .Output("outputs: T")
    .Output("h: T")
    TFBS_SEQUENCE_ATTRS
    .Attr("recurrent_activation: string = 'sigmoid'")
    .Attr("reset_after: bool = true")
    .SetShapeFn([](InferenceContext* c) { return SequenceShape(c, 1); })
    .Doc(R"doc(
GRU over a whole sequence with a block-sparse recurrent matrix (Keras GRU
semantics, gates z, r, h; reset_after as in tf_keras).

x_proj: [batch, time, 3 * units], x @ W + input bias.
recurrent_bias: [3 * units], added to h @ U (reset_after), or an empty vector.
)doc");

REGISTER_OP("TfbsBsrSimpleRnnSequence")
    .Input("x_proj: T")
    .Input("h0: T")
    .Input("mask: bool")
    .Input("values: T")
    .Input("col_indices: int32")
    .Input("row_ptr: int32")
    .Input("dense_shape: int64")
    .Output("outputs: T")
    .Output("h: T")
    TFBS_SEQUENCE_ATTRS
    .SetShapeFn([](InferenceContext* c) { return SequenceShape(c, 1); })
    .Doc(R"doc(
SimpleRNN over a whole sequence: h_t = activation(x_proj[:, t] + h_{t-1} @ U).
)doc");

#undef TFBS_SEQUENCE_ATTRS

}  // namespace tfbs
