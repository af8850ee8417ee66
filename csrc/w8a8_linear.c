/* y = x W^T + bias with 8-bit weights and 8-bit activations: quantize.py's --quantize=w8a8.
 *
 * Weights: int8 with one float scale per output row, stored as uint8 (w + 128), because the
 * VNNI instruction multiplies unsigned bytes by signed ones. Activations: each row of x is
 * quantized here in blocks of 32 (scale = the block's largest |x| / 127, as llama.cpp's q8_0
 * quantizes them). A block's dot product is exact in int32; blocks are summed in float.
 *
 * Every output element is computed by the same sequence of operations whatever the number of
 * rows M and of threads, so a row's result never depends on the other rows of its batch, and
 * the portable path (no AVX-512 VNNI) gives the same bits as the vector one.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define VECTORIZED 1
#else
#define VECTORIZED 0
#endif

#define BLOCK 32 /* activations per scale */
#define CHUNK 64 /* bytes per step: 16 lanes of 4 products */
#define LANES 16

int w8a8_vectorized(void) { return VECTORIZED; }

static float from_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static uint16_t to_bf16(float f) { /* round to nearest even, as torch's conversion */
    uint32_t u; memcpy(&u, &f, 4);
    if (isnan(f)) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* One activation row, quantized: its int8 values (K, padded with zeros to a whole chunk), and
 * per lane of 4 values the block's scale and -128 * the lane's sum (taking back the + 128 of the weights). */
typedef struct { int8_t *q; float *scale; int32_t *offset; } Row;

/* 32 values of x from index i (zeros past K) */
static void load_block(const void *x, int bf16, int64_t K, int64_t i, float *v) {
    for (int j = 0; j < BLOCK; j++)
        v[j] = i + j >= K ? 0.f : bf16 ? from_bf16(((const uint16_t *)x)[i + j]) : ((const float *)x)[i + j];
}

/* amax / 127; NaN for a block holding NaN or infinity; 0 where 1 / scale would overflow (every
 * value below about 1e-36: the block counts as zeros) */
static float block_scale(float amax, int finite) {
    if (!finite) return NAN;
    float d = amax / 127.f;
    return isinf(1.f / d) ? 0.f : d;
}

/* A block's scale is its largest |x| / 127, its values x / scale rounded to nearest even; a block
 * holding NaN or infinity gets a NaN scale, so the outputs it touches are NaN as without quantization. */
static void quantize_row(const void *x, int bf16, int64_t K, Row r) {
    int64_t padded = (K + CHUNK - 1) / CHUNK * CHUNK;
    for (int64_t b = 0; b < padded; b += BLOCK) {
        float v[BLOCK];
        load_block(x, bf16, K, b, v);
#if VECTORIZED
        __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        int finite = !(_mm512_fpclass_ps_mask(lo, 0x99) | _mm512_fpclass_ps_mask(hi, 0x99));  /* NaN or infinity */
        float d = block_scale(amax, finite), inverse = d != 0.f && finite ? 1.f / d : 0.f;
        __m512 f = _mm512_set1_ps(inverse);
        __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, f)));
        __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, f)));
        _mm_storeu_si128((__m128i *)(r.q + b), q0);
        _mm_storeu_si128((__m128i *)(r.q + b + 16), q1);
#else
        float amax = 0.f;
        int finite = 1;
        for (int i = 0; i < BLOCK; i++) {
            amax = fmaxf(amax, fabsf(v[i]));
            finite &= isfinite(v[i]) != 0;
        }
        float d = block_scale(amax, finite), inverse = d != 0.f && finite ? 1.f / d : 0.f;
        for (int i = 0; i < BLOCK; i++) r.q[b + i] = (int8_t)fminf(fmaxf(nearbyintf(v[i] * inverse), -128.f), 127.f);
#endif
        for (int lane = 0; lane < BLOCK / 4; lane++) {
            int32_t sum = 0;
            for (int j = 0; j < 4; j++) sum += r.q[b + 4 * lane + j];
            r.scale[b / 4 + lane] = d;
            r.offset[b / 4 + lane] = -128 * sum;
        }
    }
}

static float reduce(const float *a) { /* a fixed order, shared by both paths */
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* One weight row w against `count` (at most 4) activation rows x: per row, the sum over chunks of
 * float(the lanes' exact dot products) * the lanes' scales, reduced in a fixed order. */
static inline __attribute__((always_inline)) void dot_row(const uint8_t *w, int64_t K, int64_t padded,
                                                         const Row *x, int count, float *out) {
    float acc[4][LANES];
#if VECTORIZED
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < padded; k += CHUNK) {  /* the weight row read once, in order */
        __mmask64 in = k + CHUNK <= K ? ~(__mmask64)0 : (~(__mmask64)0) >> (CHUNK - (K - k));
        __m512i wv = _mm512_maskz_loadu_epi8(in, w + k);
        for (int m = 0; m < count; m++) {
            __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(x[m].offset + k / 4), wv, _mm512_loadu_si512(x[m].q + k));
            a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(x[m].scale + k / 4), a[m]);  /* d: exact */
        }
    }
    for (int m = 0; m < count; m++) _mm512_storeu_ps(acc[m], a[m]);
#else
    for (int m = 0; m < count; m++)
        for (int l = 0; l < LANES; l++) acc[m][l] = 0.f;
    for (int64_t k = 0; k < padded; k += CHUNK)
        for (int m = 0; m < count; m++)
            for (int l = 0; l < LANES; l++) {
                int32_t d = x[m].offset[k / 4 + l];
                for (int j = 0; j < 4; j++) {
                    int64_t i = k + 4 * l + j;
                    d += (int32_t)(i < K ? w[i] : 0) * x[m].q[i];
                }
                acc[m][l] = fmaf((float)d, x[m].scale[k / 4 + l], acc[m][l]);
            }
#endif
    for (int m = 0; m < count; m++) out[m] = reduce(acc[m]);
}

/* x (M, K), w (N, K) uint8, scale (N) and bias (N or NULL) float32, y (M, N); x and y float32
 * or bfloat16 as the flags say. Returns 0, or -1 if memory ran out. */
int w8a8_linear(const void *x, int x_bf16, const uint8_t *w, const float *scale, const float *bias,
                void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int threads) {
    if (M == 0 || N == 0) return 0;
    int64_t padded = (K + CHUNK - 1) / CHUNK * CHUNK;
    char *scratch = malloc((size_t)M * (padded + 2 * padded));  /* q, then a float and an int32 per 4 values */
    if (!scratch) return -1;
    Row *rows = malloc((size_t)M * sizeof(Row));
    if (!rows) { free(scratch); return -1; }
    #pragma omp parallel for schedule(static) num_threads(threads) if (M > 1)
    for (int64_t m = 0; m < M; m++) {
        char *base = scratch + (size_t)m * 3 * padded;
        rows[m] = (Row){(int8_t *)base, (float *)(base + padded), (int32_t *)(base + 2 * padded)};
        quantize_row((const char *)x + (size_t)m * K * (x_bf16 ? 2 : 4), x_bf16, K, rows[m]);
    }
    #pragma omp parallel for schedule(static) num_threads(threads)  /* each thread a contiguous stretch of rows */
    for (int64_t n = 0; n < N; n++) {
        float dots[4];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int count = M - m0 < 4 ? (int)(M - m0) : 4;
            if (count == 4) dot_row(w + n * K, K, padded, rows + m0, 4, dots);  /* constants: accumulators in registers */
            else if (count == 1) dot_row(w + n * K, K, padded, rows + m0, 1, dots);
            else dot_row(w + n * K, K, padded, rows + m0, count, dots);
            for (int i = 0; i < count; i++) {
                float v = dots[i] * scale[n] + (bias ? bias[n] : 0.f);  /* not fused: -ffp-contract=off */
                if (y_bf16) ((uint16_t *)y)[(m0 + i) * N + n] = to_bf16(v);
                else ((float *)y)[(m0 + i) * N + n] = v;
            }
        }
    }
    free(rows);
    free(scratch);
    return 0;
}
