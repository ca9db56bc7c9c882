// Scalar math shared by the CPU kernels, written so that the compiler vectorises the loops that call it.
#pragma once

#include <algorithm>
#include <cstdint>

// Forced inlining for the scalar math called inside the vectorised loops: a call left out of line stops the
// loop from vectorising (about 3x slower), and the compiler's own inlining budget is shared by the whole file.
#if defined(__GNUC__) || defined(__clang__)
#define SEQUENCER_INLINE inline __attribute__((always_inline))
#else
#define SEQUENCER_INLINE inline
#endif

// Pointers that do not alias, so that loops writing through one and reading through another vectorise.
#if defined(_MSC_VER)
#define SEQUENCER_RESTRICT __restrict
#else
#define SEQUENCER_RESTRICT __restrict__
#endif

namespace sequencer_cpu {

// exp on [-87, 88] (Cephes-style range reduction and polynomial, about 1 ulp)
SEQUENCER_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float fx = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  int32_t n = static_cast<int32_t>(fx);
  return y * __builtin_bit_cast(float, (n + 127) << 23);
}

}  // namespace sequencer_cpu
