/* One decoding step of a Llama-family decoder, every layer in one call from Python.
 *
 * Why: at batch 1 the weights of SmolLM2-135M take ~7 ms to stream in int8, but the eager
 * step around them (RMSNorm, rotary, cache writes, attention, residuals, SiLU: ~25 torch ops
 * and 4 kernel calls per layer, 30 layers) cost more than that again in dispatch alone
 * (benchmarks/RESULTS.md, issue 20). Here the same arithmetic runs as plain loops between the
 * matrix products, which stay those of quantized_matmul.c (int8, int4) or float32_linear
 * below; llama.cpp's decoder loop is the model (ggml graphs, no per-op dispatch).
 *
 * What one layer computes, as transformers' LlamaDecoderLayer and polymodal.engine.decoder:
 *   x = rms_norm(h) * w_in;  q, k, v = x Wq^T, x Wk^T, x Wv^T (+ biases)
 *   q, k rotated (rotate_half); k, v written to the cache at each row's slot
 *   a = softmax(q k^T / sqrt(hd), keys where key_mask) v   (grouped-query: H / H_kv heads share a kv head)
 *   h = h + a Wo^T;  x = rms_norm(h) * w_post;  h = h + (silu(x Wg^T) * x Wu^T) Wd^T
 *
 * Shapes: hidden float32 [M, D] (one new token per row, updated in place); keys and values of
 * each layer float32 [cache_rows, H_kv, slots, hd]; key_mask uint8 [cache_rows, slots]; cos
 * and sin float32 [M, hd] at each token's position.
 *
 * Vector code is written on simd.h's vf (16 floats with AVX-512, 8 with AVX2).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

int int8_linear(const float *x, int64_t M, int64_t K, int count, const int8_t *const *q,
                const float *const *s, const int64_t *n, float *y, int64_t ldy, int threads);
int int4_linear(const float *x, int64_t M, int64_t K, int count, const uint8_t *const *packed,
                const uint16_t *const *scales, const uint16_t *const *mins, int group, const int64_t *n,
                float *y, int64_t ldy, int threads);

enum { KIND_FLOAT32 = 0, KIND_INT8 = 1, KIND_INT4 = 2 };

/* One linear layer: float32 weight [N, K]; or int8 weight [N, K] and float32 scales [N]; or
 * int4 packed uint8 [N, K/2] with float16 scales and mins [N, K/group]. bias [N] or NULL.
 * A LoRA adapter kept beside it (peft's Linear, unmerged): y += lora_scale * B (A x) with
 * lora_a float32 [rank, K] and lora_b float32 [N, rank]; rank 0 for none. */
typedef struct {
    const void *weight, *scales, *mins;
    const float *bias;
    int64_t rows;
    const float *lora_a, *lora_b;
    int64_t rank;
    float lora_scale;
} Matrix;

static void lora_add(const float *x, int64_t M, int64_t K, int count, const Matrix *const *ms, float *y,
                     int64_t ldy, float *down, int threads);

typedef struct {
    const float *input_norm, *post_attention_norm; /* [D] */
    Matrix q, k, v, o, gate, up, down;
} Layer;

typedef struct {
    int64_t hidden, intermediate, slots; /* D, I, cache slots per row */
    int heads, kv_heads, head_dim, kind, group;
    float eps;
} Shape;

/* ---- float32 ---- y = x W^T at batch 1-8: each thread takes blocks of 4 output rows and runs
 * every activation row against them (a block's weights read from memory once), prefetching
 * ahead of each row's stream as quantized_matmul.c does. */
#define F32_ROWS 4
#define F32_PREFETCH 4096

int float32_linear(const float *x, int64_t M, int64_t K, int count, const float *const *w,
                          const int64_t *n, float *y, int64_t ldy, int threads) {
    if (K % 16 != 0 || count < 1 || count > 8) return 1;
    int64_t blocks = 0, offsets[8] = {0}, starts[9] = {0};
    for (int j = 0; j < count; j++) {
        blocks += (n[j] + F32_ROWS - 1) / F32_ROWS;
        starts[j + 1] = blocks;
        if (j + 1 < count) offsets[j + 1] = offsets[j] + n[j];
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        int j = 0;
        while (block >= starts[j + 1]) j++;
        int64_t first = (block - starts[j]) * F32_ROWS;
        int rows = (int)(n[j] - first < F32_ROWS ? n[j] - first : F32_ROWS);
        const float *weights = w[j] + first * K;
        for (int64_t m = 0; m < M; m++) {
            vf acc[F32_ROWS];
            for (int r = 0; r < F32_ROWS; r++) acc[r] = vf_zero();
            for (int64_t c = 0; c < K; c += VF_LANES) {
                vf xv = vf_load(x + m * K + c);
                for (int r = 0; r < rows; r++) {
                    _mm_prefetch((const char *)(weights + r * K + c) + F32_PREFETCH, _MM_HINT_T0);
                    acc[r] = vf_fmadd(vf_load(weights + r * K + c), xv, acc[r]);
                }
            }
            for (int r = 0; r < rows; r++) y[m * ldy + offsets[j] + first + r] = vf_sum(acc[r]);
        }
    }
    return 0;
}

/* `count` matrices sharing input x [M, K] -> y [M, ldy], matrix j in the columns after
 * matrices 0..j-1 (one call: one activation quantization, one parallel region). */
static int linear(const Shape *shape, const float *x, int64_t M, int64_t K, int count, const Matrix *const *ms,
                  float *y, int64_t ldy, int threads) {
    const void *weights[8], *scales[8], *mins[8];
    int64_t n[8];
    for (int j = 0; j < count; j++) {
        weights[j] = ms[j]->weight, scales[j] = ms[j]->scales, mins[j] = ms[j]->mins, n[j] = ms[j]->rows;
    }
    int failed;
    if (shape->kind == KIND_INT8)
        failed = int8_linear(x, M, K, count, (const int8_t *const *)weights, (const float *const *)scales, n, y,
                             ldy, threads);
    else if (shape->kind == KIND_INT4)
        failed = int4_linear(x, M, K, count, (const uint8_t *const *)weights, (const uint16_t *const *)scales,
                             (const uint16_t *const *)mins, shape->group, n, y, ldy, threads);
    else
        failed = float32_linear(x, M, K, count, (const float *const *)weights, n, y, ldy, threads);
    int64_t offset = 0, ranks = 0;
    for (int j = 0; j < count && !failed; offset += n[j], j++) {
        ranks += ms[j]->rank;
        if (ms[j]->bias == NULL) continue;
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < n[j]; i++) y[m * ldy + offset + i] += ms[j]->bias[i];
    }
    if (!failed && ranks > 0) {
        float *down = malloc(sizeof(float) * M * ranks);
        if (down == NULL) return 1;
        lora_add(x, M, K, count, ms, y, ldy, down, threads);
        free(down);
    }
    return failed;
}

/* out [M, D] = x / sqrt(mean(x^2) + eps) * weight (statistics in float32, as LlamaRMSNorm). */
static void rms_norm(const float *x, const float *weight, int64_t M, int64_t D, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        double squares = 0.0;
        for (int64_t d = 0; d < D; d++) squares += (double)x[m * D + d] * x[m * D + d];
        float inverse = 1.0f / sqrtf((float)(squares / (double)D) + eps);
        for (int64_t d = 0; d < D; d++) out[m * D + d] = x[m * D + d] * inverse * weight[d];
    }
}

/* Rotate `heads` vectors of hd at v in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). */
static void rotate(float *v, int heads, int hd, const float *cos, const float *sin) {
    int half = hd / 2;
    for (int h = 0; h < heads; h++) {
        float *x = v + h * hd;
        for (int d = 0; d < half; d++) {
            float first = x[d], second = x[d + half];
            x[d] = first * cos[d] - second * sin[d];
            x[d + half] = second * cos[d + half] + first * sin[d + half];
        }
    }
}

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up for n values (n % VF_LANES == 0). */
static void silu_times(const float *gate, const float *up, int64_t n, float *out) {
    const vf one = vf_set1(1.0f);
    for (int64_t i = 0; i < n; i += VF_LANES) {
        vf g = vf_load(gate + i);
        vf e = vf_exp(vf_sub(vf_zero(), g));
        vf_store(out + i, vf_mul(vf_div(g, vf_add(one, e)), vf_load(up + i)));
    }
}

static inline float dot(const float *a, const float *b, int n) {
    int d = 0;
    vf acc = vf_zero();
    for (; d + VF_LANES <= n; d += VF_LANES) acc = vf_fmadd(vf_load(a + d), vf_load(b + d), acc);
    float sum = vf_sum(acc);
    for (; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* y [M, ldy] += scale_j * (x A_j^T) B_j^T for each matrix j with an adapter: the rank-r
 * projections down [M, sum of ranks] first (one parallel region), then up into each output
 * column (another). */
static void lora_add(const float *x, int64_t M, int64_t K, int count, const Matrix *const *ms, float *y,
                     int64_t ldy, float *down, int threads) {
    int64_t first_rank[9] = {0}, first_row[9] = {0};
    for (int j = 0; j < count; j++) {
        first_rank[j + 1] = first_rank[j] + ms[j]->rank;
        first_row[j + 1] = first_row[j] + ms[j]->rows;
    }
    int64_t ranks = first_rank[count], rows = first_row[count];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < M * ranks; task++) {
        int64_t m = task / ranks, r = task % ranks;
        int j = 0;
        while (r >= first_rank[j + 1]) j++;
        const Matrix *mat = ms[j];
        down[task] = dot(mat->lora_a + (r - first_rank[j]) * K, x + m * K, (int)K) * mat->lora_scale;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < rows; row++) {
        int j = 0;
        while (row >= first_row[j + 1]) j++;
        const Matrix *mat = ms[j];
        if (mat->rank == 0) continue;
        const float *up = mat->lora_b + (row - first_row[j]) * mat->rank;
        for (int64_t m = 0; m < M; m++) y[m * ldy + row] += dot(up, down + m * ranks + first_rank[j], (int)mat->rank);
    }
}

/* Attention of each row's one query per head over its cache row's slots 0..span-1 that
 * key_mask marks. qkv [M, (H + 2 H_kv) hd] holds the rotated queries; out [M, H hd];
 * scores: M * H * span floats of scratch. */
static void attend(const Shape *shape, const float *qkv, const float *keys, const float *values,
                   const uint8_t *key_mask, const int64_t *cache_rows, int64_t M, int64_t span,
                   float *scores, float *out, int threads) {
    int H = shape->heads, Hkv = shape->kv_heads, hd = shape->head_dim, group = H / Hkv;
    int64_t width = (int64_t)(H + 2 * Hkv) * hd, slots = shape->slots;
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < M * H; task++) {
        int64_t m = task / H;
        int h = (int)(task % H), g = h / group;
        const float *query = qkv + m * width + (int64_t)h * hd;
        const float *k = keys + ((cache_rows[m] * Hkv + g) * slots) * hd;
        const float *v = values + ((cache_rows[m] * Hkv + g) * slots) * hd;
        const uint8_t *visible = key_mask + cache_rows[m] * slots;
        float *score = scores + task * span, *o = out + m * (int64_t)H * hd + (int64_t)h * hd;
        float highest = -INFINITY;
        for (int64_t s = 0; s < span; s++) {
            score[s] = visible[s] ? dot(query, k + s * hd, hd) * scale : -INFINITY;
            if (score[s] > highest) highest = score[s];
        }
        int64_t s = 0;
        vf sums = vf_zero();
        for (; s + VF_LANES <= span; s += VF_LANES) {  /* masked slots (-inf) weigh exactly 0 */
            vf raw = vf_load(score + s);
            vf e = vf_zero_where_minus_inf(raw, vf_exp(vf_sub(raw, vf_set1(highest))));
            vf_store(score + s, e);
            sums = vf_add(sums, e);
        }
        float total = vf_sum(sums);
        for (; s < span; s++) {
            score[s] = visible[s] ? expf(score[s] - highest) : 0.0f;
            total += score[s];
        }
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        for (s = 0; s < span; s++) {
            if (score[s] == 0.0f) continue;
            float p = score[s] / total;
            for (int d = 0; d < hd; d++) o[d] += p * v[s * hd + d];
        }
    }
}

/* The attention half of a layer: hidden [M, D] += attention(rms_norm(hidden)) Wo^T. */
static int attention_half(const Shape *shape, const Layer *layer, float *hidden, int64_t M, float *keys,
                          float *values, const uint8_t *key_mask, const int64_t *cache_rows, const int64_t *slots,
                          int64_t span, const float *cos, const float *sin, float *x, float *qkv, float *scores,
                          float *attended, float *projected, int threads) {
    int64_t D = shape->hidden;
    int H = shape->heads, Hkv = shape->kv_heads, hd = shape->head_dim;
    int64_t width = (int64_t)(H + 2 * Hkv) * hd;
    rms_norm(hidden, layer->input_norm, M, D, shape->eps, x);
    const Matrix *qkv_matrices[3] = {&layer->q, &layer->k, &layer->v};
    if (linear(shape, x, M, D, 3, qkv_matrices, qkv, width, threads)) return 1;
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * width;
        rotate(row, H + Hkv, hd, cos + m * hd, sin + m * hd); /* queries, then keys: contiguous */
        for (int g = 0; g < Hkv; g++) {
            int64_t at = ((cache_rows[m] * Hkv + g) * shape->slots + slots[m]) * hd;
            memcpy(keys + at, row + (int64_t)(H + g) * hd, hd * sizeof(float));
            memcpy(values + at, row + (int64_t)(H + Hkv + g) * hd, hd * sizeof(float));
        }
    }
    attend(shape, qkv, keys, values, key_mask, cache_rows, M, span, scores, attended, threads);
    const Matrix *o[1] = {&layer->o};
    if (linear(shape, attended, M, (int64_t)H * hd, 1, o, projected, D, threads)) return 1;
    for (int64_t i = 0; i < M * D; i++) hidden[i] += projected[i];
    return 0;
}

/* The MLP half: hidden [M, D] += (silu(x Wg^T) * x Wu^T) Wd^T with x = rms_norm(hidden). */
static int mlp_half(const Shape *shape, const Layer *layer, float *hidden, int64_t M, float *x, float *gate_up,
                    float *activated, float *projected, int threads) {
    int64_t D = shape->hidden, I = shape->intermediate;
    rms_norm(hidden, layer->post_attention_norm, M, D, shape->eps, x);
    const Matrix *gate_and_up[2] = {&layer->gate, &layer->up};
    if (linear(shape, x, M, D, 2, gate_and_up, gate_up, 2 * I, threads)) return 1;
    for (int64_t m = 0; m < M; m++) silu_times(gate_up + m * 2 * I, gate_up + m * 2 * I + I, I, activated + m * I);
    const Matrix *down[1] = {&layer->down};
    if (linear(shape, activated, M, I, 1, down, projected, D, threads)) return 1;
    for (int64_t i = 0; i < M * D; i++) hidden[i] += projected[i];
    return 0;
}

/* Every layer for M new tokens, one per row: hidden [M, D] in, the last layer's output out
 * (before the final norm). Row m's token sits at cache row cache_rows[m], slot slots[m];
 * attention reads slots 0..span-1 where key_mask (which must already mark the new slots).
 * keys[l], values[l]: layer l's cache. Returns 0, or 1 when memory runs out or a shape is
 * refused (K not a multiple of 64; hidden may then be partly updated). */
int llama_decode_step(const Layer *layers, int count, const Shape *shape, float *hidden, int64_t M,
                      float *const *keys, float *const *values, const uint8_t *key_mask,
                      const int64_t *cache_rows, const int64_t *slots, int64_t span, const float *cos,
                      const float *sin, int threads) {
    int64_t D = shape->hidden, I = shape->intermediate;
    int H = shape->heads, Hkv = shape->kv_heads, hd = shape->head_dim;
    if (Hkv < 1 || H % Hkv != 0 || hd % 2 != 0) return 1;
    int64_t width = (int64_t)(H + 2 * Hkv) * hd, widest = D > (int64_t)H * hd ? D : (int64_t)H * hd;
    float *x = malloc(sizeof(float) * M * (widest > I ? widest : I));
    float *qkv = malloc(sizeof(float) * M * width);
    float *scores = malloc(sizeof(float) * M * H * span + 64);
    float *attended = malloc(sizeof(float) * M * H * hd);
    float *projected = malloc(sizeof(float) * M * D);
    float *gate_up = malloc(sizeof(float) * M * 2 * I);
    int failed = !x || !qkv || !scores || !attended || !projected || !gate_up;
    for (int l = 0; l < count && !failed; l++) {
        failed = attention_half(shape, &layers[l], hidden, M, keys[l], values[l], key_mask, cache_rows, slots, span,
                                cos, sin, x, qkv, scores, attended, projected, threads)
                 || mlp_half(shape, &layers[l], hidden, M, x, gate_up, x, projected, threads);
    }
    free(x), free(qkv), free(scores), free(attended), free(projected), free(gate_up);
    return failed;
}
