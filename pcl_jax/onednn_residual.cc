// XLA FFI custom calls for a residual block's join, relu(y + shortcut), on oneDNN, used by
// onednn_residual.py: the forward is a binary add with a ReLU post-op, the backward ReLU's
// gradient from the output (dy * (out > 0)), which both summands receive. float32, any shape
// (treated as a flat vector: the op is elementwise).
//
// Why: under model.conv_impl=onednn XLA runs on one thread (host_threads), and its add + max
// forward and select backward over ResNet's activations took ~17 ms of the 32 px step
// (session 11 profile); oneDNN's kernels run on every core.
#include <cstdint>
#include <memory>
#include <unordered_map>

#include "onednn_runtime.h"

using namespace dnnl;
using namespace pcl_onednn;

namespace {

struct Join {
  memory::desc data;
  primitive forward, backward;
};

// The cached primitives for `elements` float32s (callers hold the lock).
Join& join_for(int64_t elements) {
  static std::unordered_map<int64_t, std::unique_ptr<Join>> cache;
  auto& slot = cache[elements];
  if (slot) return *slot;
  auto join = std::make_unique<Join>();
  join->data = memory::desc({elements}, memory::data_type::f32, memory::format_tag::x);
  post_ops relu;
  relu.append_eltwise(algorithm::eltwise_relu, 0.f, 0.f);
  primitive_attr attr;
  attr.set_post_ops(relu);
  join->forward = binary(binary::primitive_desc(cpu(), algorithm::binary_add, join->data,
                                                join->data, join->data, attr));
  // The backward's hint: a forward ReLU that reads its own output (use_dst_for_bwd).
  auto hint = eltwise_forward::primitive_desc(cpu(), prop_kind::forward_training,
                                              algorithm::eltwise_relu_use_dst_for_bwd,
                                              join->data, join->data, 0.f, 0.f);
  join->backward = eltwise_backward(eltwise_backward::primitive_desc(
      cpu(), algorithm::eltwise_relu_use_dst_for_bwd, join->data, join->data, join->data, 0.f,
      0.f, hint));
  slot = std::move(join);
  return *slot;
}

using Data = ffi::Buffer<ffi::F32>;

ffi::Error Forward(Data y, Data shortcut, ffi::ResultBuffer<ffi::F32> out) {
  return guarded("residual add + ReLU forward", [&](stream& s) {
    Join& join = join_for(static_cast<int64_t>(y.element_count()));
    join.forward.execute(s, {{DNNL_ARG_SRC_0, view(join.data, y.typed_data())},
                             {DNNL_ARG_SRC_1, view(join.data, shortcut.typed_data())},
                             {DNNL_ARG_DST, view(join.data, out->typed_data())}});
  });
}

ffi::Error Backward(Data out, Data out_grad, ffi::ResultBuffer<ffi::F32> grad) {
  return guarded("residual add + ReLU backward", [&](stream& s) {
    Join& join = join_for(static_cast<int64_t>(out.element_count()));
    join.backward.execute(s, {{DNNL_ARG_DST, view(join.data, out.typed_data())},
                              {DNNL_ARG_DIFF_DST, view(join.data, out_grad.typed_data())},
                              {DNNL_ARG_DIFF_SRC, view(join.data, grad->typed_data())}});
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PclResidualForward, Forward,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PclResidualBackward, Backward,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<ffi::Buffer<ffi::F32>>());
