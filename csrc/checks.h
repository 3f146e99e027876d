// Input checks at the boundary of every native op: each failure names the argument and raises ValueError.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace thinkless {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "thinkless._C: ", name, " must be a CPU tensor, got one on ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto dtype : allowed) {
    if (t.scalar_type() == dtype) return;
  }
  std::string names;
  for (auto dtype : allowed) names += std::string(names.empty() ? "" : " or ") + c10::toString(dtype);
  TORCH_CHECK_VALUE(false, "thinkless._C: ", name, " must be ", names, ", got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape, const char* like) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "thinkless._C: ", name, " has shape ", t.sizes(), ", expected ", shape,
                    " (the shape of ", like, ")");
}

// Tokens contiguous within a row; rows at any stride (a [:, 1:] slice of a bigger tensor is fine).
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "thinkless._C: ", name, " must be 2-D [B, T], got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, "thinkless._C: ", name,
                    " must have contiguous tokens (stride 1 along T); call .contiguous() first");
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "thinkless._C: ", name, " must be contiguous; call .contiguous() first");
}

}  // namespace thinkless
