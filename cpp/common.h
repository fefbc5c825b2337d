// Helpers every op family shares: argument-error formatting and the compute
// dtype rule (DESIGN §3: fp64 stays fp64, everything else computes in fp32).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace lowrank_ops {

// "(d0, d1, ...)" for error messages that name an argument's actual shape.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace lowrank_ops
