// The head sizes exegpt's attention kernels are compiled for (engine/kernels/__init__.py
// HEAD_DIMS), and the one dispatch from a run-time size to a compiled one.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace exegpt_kernels {

// f(std::integral_constant<int, HD>{}) for head size hd; any other size is refused with a
// message naming the op.
template <typename F>
void with_head_dim(int64_t hd, const char* op, F&& f) {
  switch (hd) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, op, " supports head_dim 16, 32, 64, 128; got ", hd);
  }
}

}  // namespace exegpt_kernels
