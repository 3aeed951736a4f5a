// XLA FFI custom calls for max-pooling on oneDNN (training: the forward records each window's
// winner in oneDNN's workspace, the backward routes the gradient through it), used by
// max_pool.py for ResNet's 3x3 stride-2 stem pool: NHWC float32, floor mode, padding
// that never wins (as PyTorch's max_pool2d).
//
// Why: XLA:CPU spends ~28 ms forward and ~16 ms backward per mini-ImageNet step on that pool
// (max_pool.py's slices, on one thread), ~8% of the step.
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <unordered_map>

#include "runtime.h"

using namespace dnnl;
using namespace pcl_onednn;

namespace {

struct Pool {
  memory::desc src, dst, workspace;
  pooling_forward forward;
  pooling_backward backward;
};

// The cached primitives of one pooling (callers hold the lock). `pad` is the top/left padding;
// the bottom/right one is what floor mode leaves (oneDNN wants both).
Pool& pool_for(int64_t n, int64_t h, int64_t w, int64_t c, int64_t window, int64_t stride,
               int64_t pad) {
  static std::unordered_map<std::string, std::unique_ptr<Pool>> cache;
  char key[160];
  std::snprintf(key, sizeof key, "%ld %ld %ld %ld %ld %ld %ld", n, h, w, c, window, stride, pad);
  auto& slot = cache[key];
  if (slot) return *slot;
  const int64_t oh = (h + 2 * pad - window) / stride + 1, ow = (w + 2 * pad - window) / stride + 1;
  memory::dims pad_l{pad, pad};
  memory::dims pad_r{(oh - 1) * stride + window - h - pad, (ow - 1) * stride + window - w - pad};
  auto pool = std::make_unique<Pool>();
  pool->src = memory::desc({n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc);
  pool->dst = memory::desc({n, c, oh, ow}, memory::data_type::f32, memory::format_tag::nhwc);
  auto fpd = pooling_forward::primitive_desc(
      cpu(), prop_kind::forward_training, algorithm::pooling_max, pool->src, pool->dst,
      {stride, stride}, {window, window}, {0, 0}, pad_l, pad_r);
  auto bpd = pooling_backward::primitive_desc(
      cpu(), algorithm::pooling_max, pool->src, pool->dst, {stride, stride}, {window, window},
      {0, 0}, pad_l, pad_r, fpd);
  pool->workspace = fpd.workspace_desc();
  pool->forward = pooling_forward(fpd);
  pool->backward = pooling_backward(bpd);
  slot = std::move(pool);
  return *slot;
}

using Data = ffi::Buffer<ffi::F32>;

ffi::Error Forward(Data x, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::U8> workspace,
                   int64_t window, int64_t stride, int64_t pad) {
  return guarded("max-pool forward", [&](stream& s) {
    auto d = x.dimensions();
    Pool& pool = pool_for(d[0], d[1], d[2], d[3], window, stride, pad);
    pool.forward.execute(s, {{DNNL_ARG_SRC, view(pool.src, x.typed_data())},
                             {DNNL_ARG_DST, view(pool.dst, y->typed_data())},
                             {DNNL_ARG_WORKSPACE, view(pool.workspace, workspace->typed_data())}});
  });
}

ffi::Error Backward(Data dy, ffi::Buffer<ffi::U8> workspace, ffi::ResultBuffer<ffi::F32> dx,
                    int64_t window, int64_t stride, int64_t pad) {
  return guarded("max-pool backward", [&](stream& s) {
    auto d = dx->dimensions();
    Pool& pool = pool_for(d[0], d[1], d[2], d[3], window, stride, pad);
    pool.backward.execute(s, {{DNNL_ARG_DIFF_DST, view(pool.dst, dy.typed_data())},
                              {DNNL_ARG_WORKSPACE, view(pool.workspace, workspace.typed_data())},
                              {DNNL_ARG_DIFF_SRC, view(pool.src, dx->typed_data())}});
  });
}

}  // namespace

// Bytes of workspace the pooling of [n, h, w, c] needs; -1 when oneDNN cannot make it.
extern "C" int64_t pcl_max_pool_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                                int64_t window, int64_t stride, int64_t pad) {
  try {
    std::lock_guard<std::mutex> guard(lock());
    return static_cast<int64_t>(pool_for(n, h, w, c, window, stride, pad).workspace.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

#define POOL_ATTRS .Attr<int64_t>("window").Attr<int64_t>("stride").Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PclMaxPoolForward, Forward,
    ffi::Ffi::Bind().Arg<Data>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::U8>>()
        POOL_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PclMaxPoolBackward, Backward,
    ffi::Ffi::Bind().Arg<Data>().Arg<ffi::Buffer<ffi::U8>>().Ret<ffi::Buffer<ffi::F32>>()
        POOL_ATTRS);
