/* The float vector operations the kernels share, for the two instruction sets they are built
 * for (polymodal.kernels.quantized_matmul picks one from the CPU's flags):
 *   AVX-512 (-mavx512f ...): vf = 16 floats in a zmm register;
 *   AVX2 + FMA + F16C (-mavx2 ...): vf = 8 floats in a ymm register (AMD EPYC and older Intel
 *   machines, where the AVX-512 build cannot run).
 * Code written on vf runs on either; the int8/int4 dot products differ more and have their own
 * bodies per instruction set (quantized_matmul.c).
 */
#ifndef POLYMODAL_SIMD_H
#define POLYMODAL_SIMD_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__)

typedef __m512 vf;
#define VF_LANES 16
static inline vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vf vf_clamp(vf x, float low, float high) {
    return _mm512_max_ps(_mm512_min_ps(x, vf_set1(high)), vf_set1(low));
}
static inline vf vf_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
/* p 2^n (vscalefps: any n, overflow and underflow as the product's) */
static inline vf vf_times_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
/* what expf's range allows: below -88.38, 0 */
#define VF_EXP_LOW -88.3762626647949f
#define VF_EXP_HIGH 88.3762626647949f
/* keep where raw is not -inf, else exactly 0 */
static inline vf vf_zero_where_minus_inf(vf raw, vf value) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(raw, vf_set1(-INFINITY), _CMP_NEQ_OQ), value);
}

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

typedef __m256 vf;
#define VF_LANES 8
static inline vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vf_fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vf_clamp(vf x, float low, float high) {
    return _mm256_max_ps(_mm256_min_ps(x, vf_set1(high)), vf_set1(low));
}
static inline vf vf_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline float vf_sum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* p 2^n with 2^n built in the exponent bits (no vscalefps): n must stay within [-126, 127] */
static inline vf vf_times_pow2(vf p, vf n) {
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return vf_mul(p, _mm256_castsi256_ps(bits));
}
/* keeps 2^n normal; below -87, e^x is ~1.6e-38 instead of 0 (masked softmax slots are zeroed
 * apart: vf_zero_where_minus_inf) */
#define VF_EXP_LOW -87.0f
#define VF_EXP_HIGH 88.0f
static inline vf vf_zero_where_minus_inf(vf raw, vf value) {
    return _mm256_and_ps(_mm256_cmp_ps(raw, vf_set1(-INFINITY), _CMP_NEQ_OQ), value);
}

#else
#error "polymodal's kernels need AVX-512 (F, BW, VL, VNNI) or AVX2 with FMA and F16C"
#endif

/* e^x for each lane: x = n ln2 + r with |r| <= ln2/2, e^r by Cephes' expf polynomial (relative
 * error ~1e-7), times 2^n. */
static inline vf vf_exp(vf x) {
    x = vf_clamp(x, VF_EXP_LOW, VF_EXP_HIGH);
    vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnmadd(n, vf_set1(0.693359375f), x);
    r = vf_fnmadd(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500E-4f);
    p = vf_fmadd(p, r, vf_set1(1.3981999507E-3f));
    p = vf_fmadd(p, r, vf_set1(8.3334519073E-3f));
    p = vf_fmadd(p, r, vf_set1(4.1665795894E-2f));
    p = vf_fmadd(p, r, vf_set1(1.6666665459E-1f));
    p = vf_fmadd(p, r, vf_set1(5.0000001201E-1f));
    p = vf_fmadd(vf_mul(p, r), r, vf_add(r, vf_set1(1.0f)));
    return vf_times_pow2(p, n);
}

#endif
