// XLA FFI custom call for a residual block's join, relu(y + shortcut), on oneDNN, used by
// residual.py: a binary add with a ReLU post-op. float32, any shape (treated as a flat
// vector: the op is elementwise). Its gradient stays in XLA (see residual.py).
//
// Why: under runtime.conv_impl=onednn XLA runs on one thread (host_threads), and its add + max
// over ResNet's activations took ~11 ms of the 32 px step (a step profile); oneDNN's kernel
// runs on every core.
#include <cstdint>
#include <memory>
#include <unordered_map>

#include "runtime.h"

using namespace dnnl;
using namespace pcl_onednn;

namespace {

struct Join {
  memory::desc data;
  binary forward;
};

// The cached primitive for `elements` float32s (callers hold the lock).
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
  slot = std::move(join);
  return *slot;
}

using Data = ffi::Buffer<ffi::F32>;

ffi::Error Forward(Data y, Data shortcut, ffi::ResultBuffer<ffi::F32> out) {
  return guarded("residual add + ReLU", [&](stream& s) {
    Join& join = join_for(static_cast<int64_t>(y.element_count()));
    join.forward.execute(s, {{DNNL_ARG_SRC_0, view(join.data, y.typed_data())},
                             {DNNL_ARG_SRC_1, view(join.data, shortcut.typed_data())},
                             {DNNL_ARG_DST, view(join.data, out->typed_data())}});
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PclResidualForward, Forward,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Ret<ffi::Buffer<ffi::F32>>());
