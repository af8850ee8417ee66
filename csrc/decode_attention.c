/* Attention of one decode step on a CPU (engine.py's KV cache, float32): each row's query, per
 * head, over that row's first counts[b] cached keys and values. PyTorch's
 * scaled_dot_product_attention computes the same (it is what the tests hold this to); this
 * skips that kernel's set-up, which dominates at one query a head.
 *
 * A (row, head) is computed by the same operations whatever the batch and thread count, so a
 * row's result never depends on the others.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static float dot(const float *a, const float *b, int64_t n) {
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s = fmaf(a[i], b[i], s);
    return s;
}

/* q: (B, H, D) at strides (q_b, q_h); keys, values: (B, H, S, D) at strides (kv_b, kv_h, D);
 * counts[b] keys attended by row b (at most S); out: (B, H, D) contiguous, float32 throughout.
 * Returns 0, or -1 if memory ran out. */
int decode_attention(const float *q, int64_t q_b, int64_t q_h, const float *keys, const float *values,
                     int64_t kv_b, int64_t kv_h, const int64_t *counts, float *out,
                     int64_t B, int64_t H, int64_t D, int64_t S, float scale, int threads) {
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *p = malloc((size_t)(S > 0 ? S : 1) * sizeof(float));
        failed = p == NULL;
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!p) continue;
            int64_t b = bh / H, h = bh % H, n = counts[b] < S ? counts[b] : S;
            const float *qi = q + b * q_b + h * q_h, *k = keys + b * kv_b + h * kv_h, *v = values + b * kv_b + h * kv_h;
            float *o = out + bh * D, largest = -INFINITY, total = 0.f;
            for (int64_t s = 0; s < n; s++) {
                p[s] = dot(qi, k + s * D, D) * scale;
                largest = fmaxf(largest, p[s]);
            }
            for (int64_t s = 0; s < n; s++) p[s] = expf(p[s] - largest);
            for (int64_t s = 0; s < n; s++) total += p[s];  /* in order: the same sum for any batch */
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            for (int64_t s = 0; s < n; s++) {
                const float *vs = v + s * D;
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) o[d] = fmaf(p[s], vs[d], o[d]);
            }
            float inverse = total > 0.f ? 1.f / total : 0.f;
            for (int64_t d = 0; d < D; d++) o[d] *= inverse;
        }
        free(p);
    }
    return failed ? -1 : 0;
}
