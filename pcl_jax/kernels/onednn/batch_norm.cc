// XLA FFI custom calls for training-mode batch norm (+ ReLU) on oneDNN, used by
// batch_norm.py: NHWC float32, statistics per group of consecutive samples (shuffle-BN's
// emulation, models.GroupedBatchNorm), each group one call of oneDNN's primitive on its slice.
//
// Why: XLA:CPU spends ~1 ms on the forward and ~5 ms on the forward + backward of one
// 64x32x32x64 BN + ReLU on one thread; oneDNN's kernel 0.3 + 0.4 ms on the machine's cores.
// The ReLU is fused: the forward records which outputs it zeroed in oneDNN's workspace, and the
// backward masks the incoming gradient with it.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <unordered_map>

#include "runtime.h"

using namespace dnnl;
using namespace pcl_onednn;

namespace {

// Primitives for one group shape [n, h, w, c] (n: samples per group).
struct Norm {
  memory::desc data, channels, workspace;
  primitive forward, backward;
  size_t workspace_bytes = 0;  // per group; 0 without the ReLU
};

normalization_flags flags_for(bool relu) {
  auto flags = normalization_flags::use_scale | normalization_flags::use_shift;
  return relu ? flags | normalization_flags::fuse_norm_relu : flags;
}

// The cached primitives of one group shape (callers hold the lock, except
// pcl_batch_norm_workspace_bytes, which takes it).
Norm& norm_for(int64_t n, int64_t h, int64_t w, int64_t c, float epsilon, bool relu) {
  static std::unordered_map<std::string, std::unique_ptr<Norm>> cache;
  char key[160];
  std::snprintf(key, sizeof key, "%ld %ld %ld %ld %a %d", n, h, w, c, epsilon, int(relu));
  auto& slot = cache[key];
  if (slot) return *slot;
  auto norm = std::make_unique<Norm>();
  norm->data = memory::desc({n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc);
  norm->channels = memory::desc({c}, memory::data_type::f32, memory::format_tag::x);
  auto fpd = batch_normalization_forward::primitive_desc(
      cpu(), prop_kind::forward_training, norm->data, norm->data, epsilon, flags_for(relu));
  auto bpd = batch_normalization_backward::primitive_desc(
      cpu(), prop_kind::backward, norm->data, norm->data, norm->data, epsilon, flags_for(relu),
      fpd);
  norm->forward = batch_normalization_forward(fpd);
  norm->backward = batch_normalization_backward(bpd);
  if (relu) {
    norm->workspace = fpd.workspace_desc();
    norm->workspace_bytes = norm->workspace.get_size();
  }
  slot = std::move(norm);
  return *slot;
}

using Data = ffi::Buffer<ffi::F32>;
using Channels = ffi::Buffer<ffi::F32>;

using Args = std::unordered_map<int, memory>;

// Runs the primitive `which` of Norm once per group of x [N, H, W, C] (N / groups samples each),
// under guarded(). `fill(norm, args, data, channels)` adds the group's arguments: `data` and
// `channels` are its offsets into NHWC buffers and into [G, C] ones; `args` already holds its
// slice of the ReLU workspace when there is one.
template <typename Fill>
ffi::Error each_group(const char* what, primitive Norm::*which, Data::Dimensions x,
                      int64_t groups, float epsilon, bool relu, uint8_t* workspace, Fill fill) {
  return guarded(what, [&](stream& s) {
    const int64_t samples = x[0] / groups, c = x[3];
    const int64_t elements = samples * x[1] * x[2] * c;
    Norm& norm = norm_for(samples, x[1], x[2], c, epsilon, relu);
    for (int64_t i = 0; i < groups; ++i) {
      Args args;
      if (relu) {
        args[DNNL_ARG_WORKSPACE] = view(norm.workspace, workspace + i * norm.workspace_bytes);
      }
      fill(norm, args, i * elements, i * c);
      (norm.*which).execute(s, args);
    }
  });
}

ffi::Error Forward(Data x, Channels scale, Channels shift, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                   ffi::ResultBuffer<ffi::U8> workspace, int64_t groups, float epsilon,
                   bool relu) {
  return each_group("batch norm forward", &Norm::forward, x.dimensions(), groups, epsilon, relu,
                    workspace->typed_data(),
                    [&](Norm& norm, Args& args, int64_t data, int64_t channels) {
    args[DNNL_ARG_SRC] = view(norm.data, x.typed_data() + data);
    args[DNNL_ARG_DST] = view(norm.data, y->typed_data() + data);
    args[DNNL_ARG_SCALE] = view(norm.channels, scale.typed_data());
    args[DNNL_ARG_SHIFT] = view(norm.channels, shift.typed_data());
    args[DNNL_ARG_MEAN] = view(norm.channels, mean->typed_data() + channels);
    args[DNNL_ARG_VARIANCE] = view(norm.channels, var->typed_data() + channels);
  });
}

ffi::Error Backward(Data x, Data dy, Channels scale, Channels mean, Channels var,
                    ffi::Buffer<ffi::U8> workspace, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift,
                    int64_t groups, float epsilon, bool relu) {
  return each_group("batch norm backward", &Norm::backward, x.dimensions(), groups, epsilon,
                    relu, workspace.typed_data(),
                    [&](Norm& norm, Args& args, int64_t data, int64_t channels) {
    args[DNNL_ARG_SRC] = view(norm.data, x.typed_data() + data);
    args[DNNL_ARG_DIFF_DST] = view(norm.data, dy.typed_data() + data);
    args[DNNL_ARG_SCALE] = view(norm.channels, scale.typed_data());
    args[DNNL_ARG_MEAN] = view(norm.channels, mean.typed_data() + channels);
    args[DNNL_ARG_VARIANCE] = view(norm.channels, var.typed_data() + channels);
    args[DNNL_ARG_DIFF_SRC] = view(norm.data, dx->typed_data() + data);
    args[DNNL_ARG_DIFF_SCALE] = view(norm.channels, dscale->typed_data() + channels);
    args[DNNL_ARG_DIFF_SHIFT] = view(norm.channels, dshift->typed_data() + channels);
  });
}

}  // namespace

// Bytes of ReLU workspace one group of [n, h, w, c] needs (the forward's last output holds
// `groups` of them); -1 when oneDNN fails to make the primitive.
extern "C" int64_t pcl_batch_norm_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                  float epsilon) {
  try {
    std::lock_guard<std::mutex> guard(lock());
    return static_cast<int64_t>(norm_for(n, h, w, c, epsilon, true).workspace_bytes);
  } catch (const std::exception&) {
    return -1;
  }
}

#define NORM_ATTRS .Attr<int64_t>("groups").Attr<float>("epsilon").Attr<bool>("relu")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PclBatchNormForward, Forward,
    ffi::Ffi::Bind().Arg<Data>().Arg<Channels>().Arg<Channels>().Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::U8>>()
        NORM_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PclBatchNormBackward, Backward,
    ffi::Ffi::Bind().Arg<Data>().Arg<Data>().Arg<Channels>().Arg<Channels>().Arg<Channels>()
        .Arg<ffi::Buffer<ffi::U8>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>() NORM_ATTRS);
