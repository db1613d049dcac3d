/* Matrix products with int8 and int4 weights for batch-1 decoding on AVX-512 VNNI CPUs, and on
 * AVX2 CPUs (the same arithmetic through vpmaddubsw and vpmaddwd, as llama.cpp's AVX2 path).
 *
 * int8: y = x @ (q * s)^T for int8 weights, with the activations quantized to int8 in blocks of 32
 * (llama.cpp's Q8_0 activations) so that the dot products run on AVX-512 VNNI integer
 * instructions (vpdpbusd: 64 byte products a cycle) instead of widening each weight to float.
 *
 * Why: torch's _weight_int8pack_mm widens every weight to float and reads ~6 GB/s at batch 1
 * on 2 cores, where float32's matrix-vector product streams ~18 GB/s: 4x fewer bytes bought
 * only 1.5x (benchmarks/RESULTS.md, issue 20). Measured gains: benchmarks/RESULTS.md.
 *
 * vpdpbusd multiplies unsigned by signed bytes, so the sign of x moves onto w:
 * sum x_i w_i = sum |x_i| * (sign(x_i) w_i); |x| fits in u8 and codes in [-127, 127] negate
 * without overflow. AVX2 has no vpdpbusd: vpmaddubsw multiplies the same bytes into pairs of
 * 16-bit sums (at most 2 * 127 * 127 = 32258, so it never saturates) and vpmaddwd adds the pairs.
 *
 * int4 (below): codes 0..15 in groups of 32 or 64 inputs, w = q * scale + min per group (the
 * zero folded in: min = zero - 8 scale), the codes already unsigned for vpdpbusd.
 *
 * Shapes: x float32 [M, K], q int8 [N, K] row-major, s float32 [N], y float32 [M, N].
 * K must be a multiple of 64 (one zmm register is two blocks of 32). Each thread takes whole
 * blocks of ROWS output rows and runs every activation row against them, so a block's weights
 * are read from memory once for all M rows.
 */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define BLOCK 32
#define ROWS 4
/* bytes ahead of each row's loads: one stream per row defeats the hardware prefetcher at
 * batch 1; 4 KiB took 2 threads from 16 to 22 GB/s here (256 B: 14, 2 KiB: 20). */
#define PREFETCH 4096

/* 127 / amax, the factor to a block's codes; 0 for a block of zeros, and for one so small
 * (amax below ~4e-37) that the factor overflows: its codes would saturate to the wrong sign,
 * where 0 (products ~1e-35 short) is the honest rounding. */
static inline float block_inverse(float amax) {
    float inverse = 127.0f / amax;
    return amax > 0.0f && inverse <= 3.0e38f ? inverse : 0.0f;
}

/* activation rows per int4 weight row's pass */
#define TILE 4

/* ---- int4 ----
 * Layout (repacked from the portable codes by polymodal.kernels): per row, per chunk of 64
 * inputs, 32 bytes whose byte j holds input j in its low nibble and input j + 32 in its high
 * nibble, so one 256-bit load, a mask and a shift give the chunk's 64 codes in input order.
 * scales and mins: float16 [N, K / group], as polymodal stores them (llama.cpp's Q4_1 keeps
 * the same; one instruction to widen). */

#if defined(__AVX512VNNI__)

/* x [M, K] -> codes [M, K] in [-127, 127] and lane scales [M, K/64, 16]: lanes 0-7 carry the
 * scale of the chunk's first block of 32, lanes 8-15 that of the second. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *codes, float *lanes) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < K / BLOCK; b++) {
            const float *v = x + m * K + b * BLOCK;
            __m512 low = _mm512_loadu_ps(v), high = _mm512_loadu_ps(v + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
            /* vmaxps drops a NaN; a NaN scale carries it into every output of the row, as torch */
            bool unordered = _mm512_cmp_ps_mask(low, low, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(high, high, _CMP_UNORD_Q);
            float scale = unordered ? NAN : amax / 127.0f;
            __m512 inverse = _mm512_set1_ps(block_inverse(amax));
            /* round half to even, as MXCSR's default; |v| <= amax keeps codes in [-127, 127] */
            __m512i low_codes = _mm512_cvtps_epi32(_mm512_mul_ps(low, inverse));
            __m512i high_codes = _mm512_cvtps_epi32(_mm512_mul_ps(high, inverse));
            _mm_storeu_si128((__m128i *)(codes + m * K + b * BLOCK), _mm512_cvtsepi32_epi8(low_codes));
            _mm_storeu_si128((__m128i *)(codes + m * K + b * BLOCK + 16), _mm512_cvtsepi32_epi8(high_codes));
            float *lane = lanes + (m * (K / 64) + b / 2) * 16 + (b % 2) * 8;
            for (int i = 0; i < 8; i++) lane[i] = scale;
        }
    }
}

/* ROWS consecutive output rows of q against one activation row. */
static inline void dot_rows(const int8_t *codes, const float *lanes, const int8_t *q, int64_t K,
                            int rows, float out[ROWS]) {
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t c = 0; c < K / 64; c++) {
        __m512i xv = _mm512_loadu_si512(codes + c * 64);
        __mmask64 negative = _mm512_movepi8_mask(xv);
        __m512i magnitude = _mm512_abs_epi8(xv);
        __m512 scale = _mm512_loadu_ps(lanes + c * 16);
        for (int r = 0; r < rows; r++) {
            _mm_prefetch((const char *)(q + r * K + c * 64 + PREFETCH), _MM_HINT_T0);
            __m512i wv = _mm512_loadu_si512(q + r * K + c * 64);
            wv = _mm512_mask_sub_epi8(wv, negative, zero, wv);
            __m512i dot = _mm512_dpbusd_epi32(zero, magnitude, wv);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* The weight scale of each lane of chunk c: two groups of 32 (lanes 0-7, 8-15) or one of 64. */
static inline __m512 chunk_scales(const uint16_t *scales, int64_t c, int group) {
    if (group == 64) return _mm512_set1_ps(_cvtsh_ss(scales[c]));
    __m512 first = _mm512_set1_ps(_cvtsh_ss(scales[2 * c]));
    __m512 second = _mm512_set1_ps(_cvtsh_ss(scales[2 * c + 1]));
    return _mm512_mask_blend_ps(0xFF00, first, second);
}

/* One weight row against activation rows m0 .. m0 + tile - 1 (tile <= TILE): the row's codes
 * are unpacked once per chunk for all of them. codes, lanes and terms point at row m0. */
static inline void int4_row(const int8_t *codes, const float *lanes, const float *terms, int tile,
                            const uint8_t *packed, const uint16_t *scales, const uint16_t *mins,
                            int64_t K, int group, float out[TILE]) {
    __m512 acc[TILE];
    for (int t = 0; t < TILE; t++) acc[t] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int64_t c = 0; c < K / 64; c++) {
        _mm_prefetch((const char *)(packed + c * 32 + PREFETCH), _MM_HINT_T0);
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(packed + c * 32));
        __m256i low = _mm256_and_si256(bytes, nibble);
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        __m512i weights = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
        __m512 weight_scales = chunk_scales(scales, c, group);
        for (int t = 0; t < tile; t++) {
            __m512i dot = _mm512_dpbusd_epi32(zero, weights, _mm512_loadu_si512(codes + t * K + c * 64));
            __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(lanes + (t * (K / 64) + c) * 16));
            acc[t] = _mm512_fmadd_ps(scaled, weight_scales, acc[t]);
        }
    }
    int64_t groups = K / group;
    for (int t = 0; t < tile; t++) {
        __m512 offsets = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g += 16) {
            __mmask16 valid = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
            __m512 m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, mins + g));
            offsets = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(valid, terms + t * groups + g), offsets);
        }
        out[t] = _mm512_reduce_add_ps(acc[t]) + _mm512_reduce_add_ps(offsets);
    }
}

#else  /* AVX2 */

/* x [M, K] -> codes [M, K] in [-127, 127] and lane scales [M, K/64, 16], as above: 8 floats
 * of each half of a lane group per block (the packing and lane order of llama.cpp's AVX2
 * quantize_row_q8_0). */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *codes, float *lanes) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < K / BLOCK; b++) {
            const float *v = x + m * K + b * BLOCK;
            __m256 part[4], top = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                part[i] = _mm256_loadu_ps(v + 8 * i);
                top = _mm256_max_ps(top, _mm256_andnot_ps(sign, part[i]));
                unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(part[i], part[i], _CMP_UNORD_Q));
            }
            __m128 half = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            half = _mm_max_ps(half, _mm_movehl_ps(half, half));
            float amax = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
            __m256 inverse = _mm256_set1_ps(block_inverse(amax));
            __m256i q[4];
            for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(part[i], inverse));
            __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            bytes = _mm256_permutevar8x32_epi32(bytes, order);  /* the packs interleave 128-bit lanes */
            bytes = _mm256_max_epi8(bytes, _mm256_set1_epi8(-127));  /* -128 has no magnitude in a byte */
            _mm256_storeu_si256((__m256i *)(codes + m * K + b * BLOCK), bytes);
            float *lane = lanes + (m * (K / 64) + b / 2) * 16 + (b % 2) * 8;
            /* vmaxps drops a NaN; a NaN scale carries it into every output of the row, as torch */
            float scale = _mm256_movemask_ps(unordered) ? NAN : amax / 127.0f;
            for (int i = 0; i < 8; i++) lane[i] = scale;
        }
    }
}

/* 32 activation bytes (their magnitudes and signs) against 32 weight bytes -> 8 int32 sums of
 * 4 products each. */
static inline __m256i dot_bytes(__m256i magnitude, __m256i signs, __m256i weights) {
    __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(weights, signs));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

static inline void dot_rows(const int8_t *codes, const float *lanes, const int8_t *q, int64_t K,
                            int rows, float out[ROWS]) {
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < K / 64; c++) {
        for (int r = 0; r < rows; r++) _mm_prefetch((const char *)(q + r * K + c * 64 + PREFETCH), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(codes + c * 64 + h * 32));
            __m256i magnitude = _mm256_sign_epi8(xv, xv);
            __m256 scale = _mm256_loadu_ps(lanes + c * 16 + h * 8);
            for (int r = 0; r < rows; r++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(q + r * K + c * 64 + h * 32));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_bytes(magnitude, xv, wv)), scale, acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) out[r] = vf_sum(acc[r]);
}

/* float16 [n] -> float32 [n], 8 at a time (vcvtph2ps). */
static inline void widen_halves(const uint16_t *halves, int64_t n, float *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(halves + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(halves[i]);
}

/* As the AVX-512 int4_row: the chunk's low nibbles (inputs 0-31) and high nibbles (32-63)
 * each against their 32 activation bytes; weights 0..15 are vpmaddubsw's unsigned operand.
 * The row's float16 scales and mins are widened once up front (per chunk, two scalar
 * conversions and broadcasts cost more than the byte products). */
static inline void int4_row(const int8_t *codes, const float *lanes, const float *terms, int tile,
                            const uint8_t *packed, const uint16_t *scales, const uint16_t *mins,
                            int64_t K, int group, float out[TILE]) {
    int64_t groups = K / group;
    float row_scales[groups], row_mins[groups];
    widen_halves(scales, groups, row_scales);
    widen_halves(mins, groups, row_mins);
    __m256 acc[TILE];
    for (int t = 0; t < TILE; t++) acc[t] = _mm256_setzero_ps();
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t per_chunk = group == 64 ? 1 : 2, second = group == 64 ? 0 : 1;
    for (int64_t c = 0; c < K / 64; c++) {
        _mm_prefetch((const char *)(packed + c * 32 + PREFETCH), _MM_HINT_T0);
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(packed + c * 32));
        __m256i halves[2] = {_mm256_and_si256(bytes, nibble), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble)};
        __m256 weight_scales[2] = {_mm256_broadcast_ss(row_scales + c * per_chunk),
                                   _mm256_broadcast_ss(row_scales + c * per_chunk + second)};
        for (int t = 0; t < tile; t++) {
            for (int h = 0; h < 2; h++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(codes + t * K + c * 64 + h * 32));
                __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(halves[h], x), ones);
                __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(lanes + (t * (K / 64) + c) * 16 + h * 8));
                acc[t] = _mm256_fmadd_ps(scaled, weight_scales[h], acc[t]);
            }
        }
    }
    for (int t = 0; t < tile; t++) {
        __m256 offsets = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8)
            offsets = _mm256_fmadd_ps(_mm256_loadu_ps(row_mins + g), _mm256_loadu_ps(terms + t * groups + g), offsets);
        float offset = vf_sum(offsets);
        for (; g < groups; g++) offset += row_mins[g] * terms[t * groups + g];
        out[t] = vf_sum(acc[t]) + offset;
    }
}

#endif

/* Which matrix of `count` a global block index falls in: (matrix, its first row). Blocks are
 * numbered matrix after matrix, `ROWS` rows each (a matrix's last block may hold fewer). */
static inline int locate_block(int64_t block, int count, const int64_t *n, int64_t unit, int64_t *first) {
    for (int j = 0; j < count; j++) {
        int64_t blocks = (n[j] + unit - 1) / unit;
        if (block < blocks) { *first = block * unit; return j; }
        block -= blocks;
    }
    return -1;
}

/* `count` weight matrices against one input (q, k and v of a layer: one activation
 * quantization, one parallel region): matrix j is q[j] int8 [n[j], K] with scales s[j] [n[j]]
 * and writes columns offset_j .. offset_j + n[j] of y [M, ldy], offset_j = n[0] + ... + n[j-1].
 * Returns 0, or 1 when K is not a multiple of 64, count is not 1..8 or memory runs out
 * (nothing written). */
int int8_linear(const float *x, int64_t M, int64_t K, int count, const int8_t *const *q,
                const float *const *s, const int64_t *n, float *y, int64_t ldy, int threads) {
    if (K % 64 != 0 || count < 1 || count > 8) return 1;
    int8_t *codes = malloc((size_t)(M * K + 64));
    float *lanes = malloc((size_t)(M * (K / 64) * 16 * sizeof(float) + 64));
    if (!codes || !lanes) { free(codes); free(lanes); return 1; }
    quantize_rows(x, M, K, codes, lanes);
    int64_t blocks = 0, offsets[8] = {0};
    for (int j = 0; j < count; j++) {
        blocks += (n[j] + ROWS - 1) / ROWS;
        if (j + 1 < count) offsets[j + 1] = offsets[j] + n[j];
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        int64_t first = 0;
        int j = locate_block(block, count, n, ROWS, &first);
        int rows = (int)(n[j] - first < ROWS ? n[j] - first : ROWS);
        float out[ROWS];
        for (int64_t m = 0; m < M; m++) {
            dot_rows(codes + m * K, lanes + m * (K / 64) * 16, q[j] + first * K, K, rows, out);
            for (int r = 0; r < rows; r++) y[m * ldy + offsets[j] + first + r] = out[r] * s[j][first + r];
        }
    }
    free(codes);
    free(lanes);
    return 0;
}

/* Per activation row and group: the sum over its blocks of scale * (sum of codes), so that
 * the mins' term of a row is one short dot product: sum_g min_g * terms[g]. */
static void group_terms(const int8_t *codes, const float *lanes, int64_t K, int group, float *terms) {
    for (int64_t g = 0; g < K / group; g++) {
        float term = 0.0f;
        for (int64_t b = g * group / BLOCK; b < (g + 1) * group / BLOCK; b++) {
            int sum = 0;
            for (int i = 0; i < BLOCK; i++) sum += codes[b * BLOCK + i];
            term += lanes[(b / 2) * 16 + (b % 2) * 8] * (float)sum;
        }
        terms[g] = term;
    }
}

/* As int8_linear, for `count` int4 matrices: packed[j] uint8 [n[j], K/2] (layout above),
 * scales[j] and mins[j] float16 [n[j], K/group]. Returns 0, or 1 when K is not a multiple of
 * 64, the group is neither 32 nor 64, count is not 1..8, or memory runs out (nothing written). */
int int4_linear(const float *x, int64_t M, int64_t K, int count, const uint8_t *const *packed,
                const uint16_t *const *scales, const uint16_t *const *mins, int group, const int64_t *n,
                float *y, int64_t ldy, int threads) {
    if (K % 64 != 0 || (group != 32 && group != 64) || count < 1 || count > 8) return 1;
    int64_t groups = K / group;
    int8_t *codes = malloc((size_t)(M * K + 64));
    float *lanes = malloc((size_t)(M * (K / 64) * 16 * sizeof(float) + 64));
    float *terms = malloc((size_t)(M * groups * sizeof(float) + 64));
    if (!codes || !lanes || !terms) { free(codes); free(lanes); free(terms); return 1; }
    quantize_rows(x, M, K, codes, lanes);
    for (int64_t m = 0; m < M; m++)
        group_terms(codes + m * K, lanes + m * (K / 64) * 16, K, group, terms + m * groups);
    int64_t rows = 0, offsets[8] = {0};
    for (int j = 0; j < count; j++) {
        rows += n[j];
        if (j + 1 < count) offsets[j + 1] = offsets[j] + n[j];
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < rows; row++) {
        int64_t r = 0;
        int j = locate_block(row, count, n, 1, &r);
        float out[TILE];
        for (int64_t m = 0; m < M; m += TILE) {
            int tile = (int)(M - m < TILE ? M - m : TILE);
            int4_row(codes + m * K, lanes + m * (K / 64) * 16, terms + m * groups, tile, packed[j] + r * (K / 2),
                     scales[j] + r * groups, mins[j] + r * groups, K, group, out);
            for (int t = 0; t < tile; t++) y[(m + t) * ldy + offsets[j] + r] = out[t];
        }
    }
    free(codes);
    free(lanes);
    free(terms);
    return 0;
}
