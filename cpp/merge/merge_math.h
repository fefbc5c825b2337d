// Scalar math shared bit-for-bit by the CPU kernels, the CUDA kernels and the
// plain-torch reference (python/lowrank_ops/reference/merge.py):
//   * magnitude keys: |x| as an unsigned bit pattern, which orders like |x|
//     for non-negative IEEE floats; every NaN maps to one canonical key above +inf;
//   * the counter-based DARE hash: keep(seed, model, element) depends on those
//     three integers only, never on threads, chunking or the device.
// No torch headers here so nvcc and the host compiler both see plain C++.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LRO_HD __host__ __device__ __forceinline__
#else
#define LRO_HD inline
#endif

namespace lowrank_ops {
namespace merge_math {

template <typename acc_t>
struct MagKey;

template <>
struct MagKey<float> {
  using U = uint32_t;
  static constexpr U kNaN = 0x7FC00000u;   // canonical NaN: above +inf (0x7F800000)
  static constexpr U kInf = 0x7F800000u;
  static constexpr U kNone = 0xFFFFFFFFu;  // above every key: "keep nothing"
  LRO_HD static U of(float v) {
    U u;
#if defined(__CUDA_ARCH__)
    u = __float_as_uint(v);
#else
    std::memcpy(&u, &v, sizeof(u));
#endif
    u &= 0x7FFFFFFFu;
    return u > kInf ? kNaN : u;
  }
  LRO_HD static float value(U u) {
    float f;
#if defined(__CUDA_ARCH__)
    f = __uint_as_float(u);
#else
    std::memcpy(&f, &u, sizeof(f));
#endif
    return f;
  }
};

template <>
struct MagKey<double> {
  using U = uint64_t;
  static constexpr U kNaN = 0x7FF8000000000000ull;
  static constexpr U kInf = 0x7FF0000000000000ull;
  static constexpr U kNone = 0xFFFFFFFFFFFFFFFFull;
  LRO_HD static U of(double v) {
    U u;
#if defined(__CUDA_ARCH__)
    u = static_cast<U>(__double_as_longlong(v));
#else
    std::memcpy(&u, &v, sizeof(u));
#endif
    u &= 0x7FFFFFFFFFFFFFFFull;
    return u > kInf ? kNaN : u;
  }
  LRO_HD static double value(U u) {
    double f;
#if defined(__CUDA_ARCH__)
    f = __longlong_as_double(static_cast<long long>(u));
#else
    std::memcpy(&f, &u, sizeof(f));
#endif
    return f;
  }
};

// Number of entries magnitude pruning keeps (mergekit's sparsify.magnitude rule):
// 0 for density <= 0 or an empty tensor, all for density >= 1, otherwise
// max(1, floor(density * n)) -- a positive density keeps at least one entry.
LRO_HD int64_t topk_count(double density, int64_t n) {
  if (n <= 0 || density <= 0.0) return 0;
  if (density >= 1.0) return n;
  int64_t k = static_cast<int64_t>(density * static_cast<double>(n));
  return k < 1 ? 1 : k;
}

// splitmix64 finalizer (Steele, Lea, Flood 2014).
LRO_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// 32-bit key of (seed, model, block of 2^32 elements); constant over a block.
LRO_HD uint32_t dare_block_key(uint64_t seed, uint64_t model, uint64_t block) {
  return static_cast<uint32_t>(mix64(mix64(seed + 0x9E3779B97F4A7C15ull * (model + 1)) + block));
}

// Per-element hash: a 32-bit avalanche mix (lowbias32) of the element's low 32
// index bits xor the block key.  32-bit multiplies vectorize on every SIMD ISA.
LRO_HD uint32_t dare_hash(uint32_t block_key, uint32_t lo) {
  uint32_t x = lo ^ block_key;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Keep threshold on the 24-bit uniform (hash >> 8): keep iff u < floor(density * 2^24).
LRO_HD uint32_t dare_keep_threshold(double density) {
  if (density <= 0.0) return 0u;
  if (density >= 1.0) return 1u << 24;
  return static_cast<uint32_t>(density * 16777216.0);
}

}  // namespace merge_math
}  // namespace lowrank_ops
