// XLA FFI custom calls for 2-D convolutions on oneDNN (`runtime.conv_impl=onednn`, built and
// registered by conv.py): NHWC float32 images, HWIO float32 kernels (flax's layout), symmetric
// padding.
// Every result is written straight into XLA's output buffer, which torch_conv's torch calls cannot
// do (torch allocates its own result, then torch_conv copies it).
//
// Primitives and weight reorders are created once per shape and cached for the process; calls
// run under runtime.h's lock.
#include <cstdio>
#include <memory>
#include <string>
#include <unordered_map>

#include "runtime.h"

using namespace dnnl;
using namespace pcl_onednn;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

// Primitives for one convolution shape. Weights go through the layout each primitive prefers
// (a plain weight layout makes oneDNN 3.2 pick a reference kernel): the scratch memories hold
// them there, and the reorders, made once here too, copy from XLA's plain HWIO kernel into
// them, or out of them into an HWIO gradient. An empty reorder means the preferred layout is
// plain HWIO and no copy is needed.
//
// With `blocked_forward` / `blocked_backward`, the forward / backward-data primitive takes the
// activations in the layout oneDNN prefers (a channel-blocked one, where its jit kernels beat
// the NHWC brgemm ones on small maps), staged the same way: images or output gradients copied
// in, results copied out.
struct Conv {
  memory::desc src, dst, plain_weights;
  convolution_forward forward;
  convolution_backward_data backward_data;
  convolution_backward_weights backward_weights;
  memory forward_weights, backward_weights_in, diff_weights;
  reorder to_forward, to_backward, from_diff;
  memory forward_src, forward_dst, backward_diff_dst, backward_diff_src;
  reorder to_forward_src, from_forward_dst, to_backward_diff_dst, from_backward_diff_src;
};

using Dims = ffi::Buffer<ffi::F32>::Dimensions;

// Sets `scratch` (memory in `layout`) and `copy` (the reorder from the plain layout into
// `layout`, or out of it); leaves both empty when `layout` is the plain one already.
void stage(const memory::desc& layout, const memory::desc& plain, bool into_layout,
           memory& scratch, reorder& copy) {
  if (layout == plain) return;
  scratch = memory(layout, cpu());
  copy = into_layout ? reorder(reorder::primitive_desc(cpu(), plain, cpu(), layout))
                     : reorder(reorder::primitive_desc(cpu(), layout, cpu(), plain));
}

// The cached primitives of one shape (callers hold the lock).
Conv& conv_for(Dims x, Dims w, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
               bool blocked_forward, bool blocked_backward) {
  static std::unordered_map<std::string, std::unique_ptr<Conv>> cache;
  char key[256];
  std::snprintf(key, sizeof key, "%ld %ld %ld %ld|%ld %ld %ld %ld|%ld %ld %ld %ld|%d %d", x[0],
                x[1], x[2], x[3], w[0], w[1], w[2], w[3], sh, sw, ph, pw, int(blocked_forward),
                int(blocked_backward));
  auto& slot = cache[key];
  if (slot) return *slot;
  auto c = std::make_unique<Conv>();
  // x is NHWC, w HWIO: [kh, kw, ci, co].
  const int64_t n = x[0], h = x[1], wd = x[2], ci = x[3], kh = w[0], kw = w[1], co = w[3];
  const int64_t oh = (h + 2 * ph - kh) / sh + 1, ow = (wd + 2 * pw - kw) / sw + 1;
  memory::dims strides{sh, sw}, pads{ph, pw}, wdims{co, ci, kh, kw};
  c->src = memory::desc({n, ci, h, wd}, dt::f32, tag::nhwc);
  c->dst = memory::desc({n, co, oh, ow}, dt::f32, tag::nhwc);
  c->plain_weights = memory::desc(wdims, dt::f32, tag::hwio);
  auto any = memory::desc(wdims, dt::f32, tag::any);
  // Activations NHWC, or (blocked) in whatever layout oneDNN picks.
  auto layout = [](const memory::desc& nhwc, bool blocked) {
    return blocked ? memory::desc(nhwc.get_dims(), dt::f32, tag::any) : nhwc;
  };
  auto forward_pd = [&](bool blocked) {
    return convolution_forward::primitive_desc(cpu(), prop_kind::forward_training,
        algorithm::convolution_direct, layout(c->src, blocked), any, layout(c->dst, blocked),
        strides, pads, pads);
  };
  auto fpd = forward_pd(false);  // also the weight gradient's hint: it stays NHWC
  auto apd = blocked_forward ? forward_pd(true) : fpd;
  auto dpd = convolution_backward_data::primitive_desc(cpu(), algorithm::convolution_direct,
      layout(c->src, blocked_backward), any, layout(c->dst, blocked_backward), strides, pads,
      pads, blocked_backward ? forward_pd(true) : fpd);
  auto wpd = convolution_backward_weights::primitive_desc(cpu(), algorithm::convolution_direct,
      c->src, any, c->dst, strides, pads, pads, fpd);
  c->forward = convolution_forward(apd);
  c->backward_data = convolution_backward_data(dpd);
  c->backward_weights = convolution_backward_weights(wpd);
  stage(apd.weights_desc(), c->plain_weights, true, c->forward_weights, c->to_forward);
  stage(dpd.weights_desc(), c->plain_weights, true, c->backward_weights_in, c->to_backward);
  stage(wpd.diff_weights_desc(), c->plain_weights, false, c->diff_weights, c->from_diff);
  stage(apd.src_desc(), c->src, true, c->forward_src, c->to_forward_src);
  stage(apd.dst_desc(), c->dst, false, c->forward_dst, c->from_forward_dst);
  stage(dpd.diff_dst_desc(), c->dst, true, c->backward_diff_dst, c->to_backward_diff_dst);
  stage(dpd.diff_src_desc(), c->src, false, c->backward_diff_src, c->from_backward_diff_src);
  slot = std::move(c);
  return *slot;
}

// An input `plain` in the layout a primitive wants: `plain` itself, or `scratch` after `copy`.
memory prepared(const reorder& copy, memory& scratch, memory plain, stream& s) {
  if (!copy) return plain;
  copy.execute(s, plain, scratch);
  return scratch;
}

// Where a primitive writes a result bound for `plain`: `plain` itself, or `scratch`, which
// `finish` then copies out.
memory target(const reorder& copy, memory& scratch, memory plain) {
  return copy ? scratch : plain;
}

void finish(const reorder& copy, memory& scratch, memory plain, stream& s) {
  if (copy) copy.execute(s, scratch, plain);
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool blocked_forward,
                   bool blocked_backward) {
  return guarded("convolution forward", [&](stream& s) {
    Conv& c = conv_for(x.dimensions(), w.dimensions(), sh, sw, ph, pw, blocked_forward,
                       blocked_backward);
    memory weights = prepared(c.to_forward, c.forward_weights,
                              view(c.plain_weights, w.typed_data()), s);
    memory src = prepared(c.to_forward_src, c.forward_src, view(c.src, x.typed_data()), s);
    memory out = view(c.dst, y->typed_data());
    c.forward.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                          {DNNL_ARG_DST, target(c.from_forward_dst, c.forward_dst, out)}});
    finish(c.from_forward_dst, c.forward_dst, out, s);
  });
}

void kernel_grad(Conv& c, stream& s, float* g, float* x, float* dw) {
  memory plain = view(c.plain_weights, dw);
  memory target = c.from_diff ? c.diff_weights : plain;
  c.backward_weights.execute(s, {{DNNL_ARG_SRC, view(c.src, x)}, {DNNL_ARG_DIFF_DST, view(c.dst, g)},
                                 {DNNL_ARG_DIFF_WEIGHTS, target}});
  if (c.from_diff) c.from_diff.execute(s, c.diff_weights, plain);
}

ffi::Error Backward(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool blocked_forward,
                    bool blocked_backward) {
  return guarded("convolution backward", [&](stream& s) {
    Conv& c = conv_for(x.dimensions(), w.dimensions(), sh, sw, ph, pw, blocked_forward,
                       blocked_backward);
    memory weights = prepared(c.to_backward, c.backward_weights_in,
                              view(c.plain_weights, w.typed_data()), s);
    memory diff_dst = prepared(c.to_backward_diff_dst, c.backward_diff_dst,
                               view(c.dst, g.typed_data()), s);
    memory diff_src = view(c.src, dx->typed_data());
    c.backward_data.execute(s, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights},
        {DNNL_ARG_DIFF_SRC, target(c.from_backward_diff_src, c.backward_diff_src, diff_src)}});
    finish(c.from_backward_diff_src, c.backward_diff_src, diff_src, s);
    kernel_grad(c, s, g.typed_data(), x.typed_data(), dw->typed_data());
  });
}

ffi::Error BackwardKernel(ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw, bool blocked_forward, bool blocked_backward) {
  return guarded("convolution d kernel", [&](stream& s) {
    kernel_grad(conv_for(x.dimensions(), w.dimensions(), sh, sw, ph, pw, blocked_forward,
                         blocked_backward),
                s, g.typed_data(), x.typed_data(), dw->typed_data());
  });
}

}  // namespace

#define CONV_ATTRS .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_h") \
    .Attr<int64_t>("pad_w").Attr<bool>("blocked_forward").Attr<bool>("blocked_backward")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PclConvForward, Forward,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PclConvBackward, Backward,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()
        CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PclConvBackwardKernel, BackwardKernel,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>() CONV_ATTRS);
