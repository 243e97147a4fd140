// AVX512-BF16 helpers shared by exegpt's CPU kernels; include only where the compiler
// targets AVX512F, AVX512BW and AVX512-BF16 (the kernels' build digest covers this file).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace exegpt_bf16 {

// exp(x) for the softmax's x = score - running max <= 0, within 2 ulp (Cephes' expf);
// below -87 it returns ~0 instead of a denormal. Masked keys are zeroed by the caller.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// 16-bit lane indices that interleave 16 lanes from `from` with the 16 lanes `apart` lanes
// further on: from, from + apart, from + 1, from + 1 + apart, ... (32 lanes)
inline __m512i interleave_index(int from, int apart) {
  alignas(64) uint16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = static_cast<uint16_t>(from + i);
    idx[2 * i + 1] = static_cast<uint16_t>(from + apart + i);
  }
  return _mm512_load_si512(idx);
}

}  // namespace exegpt_bf16
