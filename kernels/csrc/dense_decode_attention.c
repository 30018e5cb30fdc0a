/* Decode attention over the CPU engine's dense KV mirror (engine/dense_kv.py).
 *
 * One work item per (sequence, KV head): the item reads that head's keys and values once,
 * however many query heads share them, so a step reads the batch's KV once (the DRAM floor at
 * the 77M shape, where torch's batched matmuls read it at about half the bandwidth).
 * Float32 only; built and loaded by kernels/native.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* glibc's vector expf (libmvec), so the softmax's exponentials vectorize without -ffast-math. */
#pragma omp declare simd notinbranch
extern float expf(float);

/* out[b, h] = softmax(scale * q[b, h] . K[b, h / group, :lens[b]]) @ V[b, h / group, :lens[b]]
 *
 * q, out: [batch, heads, head_dim] contiguous. keys, values: row b, KV head j, position t at
 * b * row_stride + j * head_stride + t * head_dim. Returns 0; -2 without reading anything
 * when a length is outside [1, capacity]; -1 when out of memory.
 */
int dense_decode_attention_f32(const float *restrict q, const float *restrict keys,
                               const float *restrict values, const int64_t *restrict lens,
                               float *restrict out, int64_t batch, int64_t heads,
                               int64_t kv_heads, int64_t head_dim, int64_t row_stride,
                               int64_t head_stride, int64_t capacity, float scale,
                               int num_threads) {
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] < 1 || lens[b] > capacity) return -2;
    const int64_t group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t allocated = 0;
        float *scores = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < batch * kv_heads; item++) {
            const int64_t b = item / kv_heads, kh = item % kv_heads, n = lens[b];
            if (n * group > allocated) {
                free(scores);
                allocated = 2 * n * group;
                scores = malloc(allocated * sizeof(float));
                if (scores == NULL) {
                    allocated = 0;
                    failed = 1;
                    continue;
                }
            }
            const float *k = keys + b * row_stride + kh * head_stride;
            const float *v = values + b * row_stride + kh * head_stride;
            const float *qb = q + (b * heads + kh * group) * head_dim;
            for (int64_t t = 0; t < n; t++) {
                const float *kt = k + t * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float *qg = qb + g * head_dim;
                    float dot = 0.f;
                    for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * kt[d];
                    scores[g * n + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *s = scores + g * n, top = -FLT_MAX, sum = 0.f;
                for (int64_t t = 0; t < n; t++) top = s[t] > top ? s[t] : top;
                for (int64_t t = 0; t < n; t++) {
                    s[t] = expf(s[t] - top);
                    sum += s[t];
                }
                const float inv = 1.f / sum;
                float *o = out + (b * heads + kh * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] = 0.f;
                for (int64_t t = 0; t < n; t++) {
                    const float *vt = v + t * head_dim, p = s[t] * inv;
                    for (int64_t d = 0; d < head_dim; d++) o[d] += p * vt[d];
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
