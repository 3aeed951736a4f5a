"""oneDNN itself as XLA FFI custom calls (`runtime.conv_impl=onednn`): the library and its ops.

`library` builds and registers the C++ (`*.cc`, `runtime.h`); `conv`, `batch_norm`, `max_pool`
and `residual` are the differentiable ops, each falling back to XLA (or torch) outside its scope.
"""
