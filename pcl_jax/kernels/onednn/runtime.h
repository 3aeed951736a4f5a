// What pcl_jax's oneDNN custom calls share (conv.cc, batch_norm.cc,
// max_pool.cc, residual.cc; built into one library by conv.py): the CPU
// engine, the one lock, and the error guard.
//
// The lock serialises every call: XLA may run independent ops concurrently (the key encoder's
// beside the query's), and two all-core OpenMP regions at once on the same cores are slower than
// one after the other (as torch_conv's _TORCH_LOCK).
#pragma once

#include <exception>
#include <mutex>
#include <string>

#include <oneapi/dnnl/dnnl.hpp>
#include "xla/ffi/api/ffi.h"

namespace pcl_onednn {

namespace ffi = xla::ffi;

inline dnnl::engine& cpu() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

inline std::mutex& lock() {
  static std::mutex m;
  return m;
}

inline dnnl::memory view(const dnnl::memory::desc& md, void* data) {
  return dnnl::memory(md, cpu(), data);
}

// Runs `body(stream)` under the lock and waits for it. oneDNN reports failures as C++
// exceptions, which must not cross the C boundary into XLA: they come back as FFI errors (the
// step then fails with their text).
template <typename Body>
ffi::Error guarded(const char* what, Body body) {
  try {
    std::lock_guard<std::mutex> guard(lock());
    dnnl::stream s(cpu());
    body(s);
    s.wait();
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN ") + what + ": " + e.what());
  }
}

}  // namespace pcl_onednn
