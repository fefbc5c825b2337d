// CPU feature queries used by the CPU kernels' heuristics (common.h).
#include "common.h"

namespace lowrank_ops {

bool cpu_is_intel() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

}  // namespace lowrank_ops
