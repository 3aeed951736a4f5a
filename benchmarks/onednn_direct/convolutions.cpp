// ResNet-18's convolutions (small stem, 32 px, batch 64: step_throughput.py's case) called on
// oneDNN directly, as an XLA FFI custom call would: NHWC activations and OHWI weights (the bytes
// of pcl_jax's XLA buffers), every output written where the caller wants it (no copy).
// Weights go through oneDNN's preferred ("any") layout with a reorder per call, since they change
// every step; with plain OHWI weights oneDNN 3.2 picks a reference kernel (minutes per pass).
// Prints one line: "onednn <forward ms> <backward ms>", medians of `reps` passes.
// Built and run by run.sh; compare.py times PyTorch's calls beside it.
#include <oneapi/dnnl/dnnl.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
using namespace dnnl;
using tag = memory::format_tag;
using dt = memory::data_type;
struct Layer { int cin, cout, k, s, p, h; };
static std::vector<Layer> layers() {
  std::vector<Layer> l = {{3, 64, 3, 1, 1, 32}};
  for (int i = 0; i < 4; ++i) l.push_back({64, 64, 3, 1, 1, 32});
  int c = 64, h = 32;
  for (int cout : {128, 256, 512}) {
    l.push_back({c, cout, 3, 2, 1, h}); l.push_back({cout, cout, 3, 1, 1, h / 2});
    l.push_back({c, cout, 1, 2, 0, h});  // downsample
    l.push_back({cout, cout, 3, 1, 1, h / 2}); l.push_back({cout, cout, 3, 1, 1, h / 2});
    c = cout; h /= 2;
  }
  return l;
}
struct Prims {
  convolution_forward fwd; convolution_backward_data bwd_d; convolution_backward_weights bwd_w;
  memory src, wei_plain, wei_fwd, wei_bwd, dst, diff_dst, diff_src, diff_wei, diff_wei_plain;
  reorder to_fwd, to_bwd, from_diff; bool r_fwd, r_bwd, r_diff;
};
int main(int argc, char** argv) {
  const int N = 64, reps = argc > 1 ? std::atoi(argv[1]) : 15;
  engine eng(engine::kind::cpu, 0); stream strm(eng);
  std::vector<Prims> ps;
  for (auto& L : layers()) {
    int oh = (L.h + 2 * L.p - L.k) / L.s + 1;
    memory::dims src{N, L.cin, L.h, L.h}, wei{L.cout, L.cin, L.k, L.k}, dst{N, L.cout, oh, oh};
    memory::dims st{L.s, L.s}, pad{L.p, L.p};
    auto src_md = memory::desc(src, dt::f32, tag::nhwc), dst_md = memory::desc(dst, dt::f32, tag::nhwc);
    auto wplain = memory::desc(wei, dt::f32, tag::ohwi);
    auto wq = memory::desc(wei, dt::f32, tag::any);
    auto fpd = convolution_forward::primitive_desc(eng, prop_kind::forward_training,
        algorithm::convolution_direct, src_md, wq, dst_md, st, pad, pad);
    auto dpd = convolution_backward_data::primitive_desc(eng, algorithm::convolution_direct,
        src_md, wq, dst_md, st, pad, pad, fpd);
    auto wpd = convolution_backward_weights::primitive_desc(eng, algorithm::convolution_direct,
        src_md, wq, dst_md, st, pad, pad, fpd);
    Prims p;
    p.fwd = convolution_forward(fpd); p.bwd_d = convolution_backward_data(dpd);
    p.bwd_w = convolution_backward_weights(wpd);
    p.src = memory(src_md, eng); p.dst = memory(dst_md, eng); p.diff_dst = memory(dst_md, eng);
    p.diff_src = memory(src_md, eng); p.wei_plain = memory(wplain, eng);
    p.diff_wei_plain = memory(wplain, eng);
    for (auto* m : {&p.src, &p.diff_dst, &p.wei_plain}) {
      float* d = (float*)m->get_data_handle(); size_t n = m->get_desc().get_size() / 4;
      for (size_t i = 0; i < n; ++i) d[i] = (float)((i * 2654435761u) % 1000) / 1000.f - 0.5f;
    }
    p.r_fwd = fpd.weights_desc() != wplain; p.r_bwd = dpd.weights_desc() != wplain;
    p.r_diff = wpd.diff_weights_desc() != wplain;
    p.wei_fwd = p.r_fwd ? memory(fpd.weights_desc(), eng) : p.wei_plain;
    p.wei_bwd = p.r_bwd ? memory(dpd.weights_desc(), eng) : p.wei_plain;
    p.diff_wei = p.r_diff ? memory(wpd.diff_weights_desc(), eng) : p.diff_wei_plain;
    if (p.r_fwd) p.to_fwd = reorder(p.wei_plain, p.wei_fwd);
    if (p.r_bwd) p.to_bwd = reorder(p.wei_plain, p.wei_bwd);
    if (p.r_diff) p.from_diff = reorder(p.diff_wei, p.diff_wei_plain);
    if (std::getenv("ONEDNN_DIRECT_VERBOSE"))
      std::fprintf(stderr, "%dx%d %d->%d s%d fwd:%s bwd_d:%s bwd_w:%s\n", L.h, L.h, L.cin, L.cout,
                   L.s, fpd.impl_info_str(), dpd.impl_info_str(), wpd.impl_info_str());
    ps.push_back(p);
  }
  std::vector<double> tf, tb;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (auto& p : ps) {
      if (p.r_fwd) p.to_fwd.execute(strm, p.wei_plain, p.wei_fwd);
      p.fwd.execute(strm, {{DNNL_ARG_SRC, p.src}, {DNNL_ARG_WEIGHTS, p.wei_fwd}, {DNNL_ARG_DST, p.dst}});
    }
    strm.wait();
    auto t1 = std::chrono::steady_clock::now();
    bool first = true;
    for (auto& p : ps) {
      if (!first) {  // the first layer's input is data: no d images (as pcl_jax)
        if (p.r_bwd) p.to_bwd.execute(strm, p.wei_plain, p.wei_bwd);
        p.bwd_d.execute(strm, {{DNNL_ARG_DIFF_DST, p.diff_dst}, {DNNL_ARG_WEIGHTS, p.wei_bwd},
                               {DNNL_ARG_DIFF_SRC, p.diff_src}});
      }
      first = false;
      p.bwd_w.execute(strm, {{DNNL_ARG_SRC, p.src}, {DNNL_ARG_DIFF_DST, p.diff_dst},
                             {DNNL_ARG_DIFF_WEIGHTS, p.diff_wei}});
      if (p.r_diff) p.from_diff.execute(strm, p.diff_wei, p.diff_wei_plain);
    }
    strm.wait();
    auto t2 = std::chrono::steady_clock::now();
    tf.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    tb.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
  }
  std::sort(tf.begin(), tf.end()); std::sort(tb.begin(), tb.end());
  const dnnl_version_t* v = dnnl_version();
  std::fprintf(stderr, "oneDNN %d.%d.%d\n", v->major, v->minor, v->patch);
  std::printf("onednn %.2f %.2f\n", tf[reps / 2], tb[reps / 2]);
}
