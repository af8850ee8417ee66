/* Attention of one decode step on a CPU (engine.py's KV cache, float32 or bfloat16): each row's
 * query, per head, over that row's first counts[b] cached keys and values, computed in float32.
 * PyTorch's scaled_dot_product_attention computes the same (it is what the tests hold this to);
 * this skips that kernel's set-up, which dominates at one query a head, and reads a bf16 cache
 * as it is (half the bytes of a float32 one).
 *
 * A (row, head) is computed by the same operations whatever the batch and thread count, so a
 * row's result never depends on the others.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* element i of a float32 or bfloat16 array, in float32 */
static inline float element(const void *x, int64_t i, int bf16) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if defined(__AVX512F__)
static inline __m512 load16(const void *x, int64_t i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)x + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

/* q . k over D values (k float32 or bf16) */
static float dot(const float *q, const void *k, int64_t D, int bf16) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k, i, bf16), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.f;
    for (int64_t i = 0; i < D; i++) s = fmaf(q[i], element(k, i, bf16), s);
    return s;
}

/* o += weight * v over D values (v float32 or bf16) */
static void add_scaled(float *o, float weight, const void *v, int64_t D, int bf16) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        __m512 w = _mm512_set1_ps(weight);
        for (int64_t i = 0; i < D; i += 16)
            _mm512_storeu_ps(o + i, _mm512_fmadd_ps(w, load16(v, i, bf16), _mm512_loadu_ps(o + i)));
        return;
    }
#endif
    for (int64_t i = 0; i < D; i++) o[i] = fmaf(weight, element(v, i, bf16), o[i]);
}

/* q: float32 (B, H, D) at strides (q_b, q_h); keys, values: (B, H, S, D) at strides (kv_b, kv_h, D),
 * float32 or (kv_bf16) bfloat16; counts[b] keys attended by row b (at most S); out: float32 (B, H, D)
 * contiguous. Returns 0, or -1 if memory ran out. */
int decode_attention(const float *q, int64_t q_b, int64_t q_h, const void *keys, const void *values, int kv_bf16,
                     int64_t kv_b, int64_t kv_h, const int64_t *counts, float *out,
                     int64_t B, int64_t H, int64_t D, int64_t S, float scale, int threads) {
    int failed = 0;
    size_t size = kv_bf16 ? 2 : 4;
    #pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *p = malloc((size_t)(S > 0 ? S : 1) * sizeof(float));
        failed = p == NULL;
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!p) continue;
            int64_t b = bh / H, h = bh % H, n = counts[b] < S ? counts[b] : S;
            const float *qi = q + b * q_b + h * q_h;
            const char *k = (const char *)keys + (b * kv_b + h * kv_h) * size;
            const char *v = (const char *)values + (b * kv_b + h * kv_h) * size;
            float *o = out + bh * D, largest = -INFINITY, total = 0.f;
            for (int64_t s = 0; s < n; s++) {
                p[s] = dot(qi, k + s * D * size, D, kv_bf16) * scale;
                largest = fmaxf(largest, p[s]);
            }
            for (int64_t s = 0; s < n; s++) p[s] = expf(p[s] - largest);
            for (int64_t s = 0; s < n; s++) total += p[s];  /* in order: the same sum for any batch */
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t s = 0; s < n; s++) add_scaled(o, p[s], v + s * D * size, D, kv_bf16);
            float inverse = total > 0.f ? 1.f / total : 0.f;
            for (int64_t d = 0; d < D; d++) o[d] *= inverse;
        }
        free(p);
    }
    return failed ? -1 : 0;
}
