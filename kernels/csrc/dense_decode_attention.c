/* Decode attention over the CPU engine's dense KV mirror (engine/dense_kv.py).
 *
 * One work item per (sequence, KV head): the item appends the step's new key and value to its
 * mirror row, then reads that head's keys and values once, however many query heads share
 * them, so a step reads the batch's KV once (the DRAM floor at the 77M shape, where torch's
 * batched matmuls read it at about half the bandwidth).
 * Float32 only; built and loaded by kernels/native.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector expf (libmvec), so the softmax's exponentials vectorize without -ffast-math. */
#pragma omp declare simd notinbranch
extern float expf(float);

/* For each decode row i: stores its new key and value (k, v: [batch, kv_heads, head_dim], at
 * k_stride, v_stride floats per row) at position lens[i] - 1 of mirror row rows[i], then
 * out[i, h] = softmax(scale * q[i, h] . K[rows[i], h / group, :lens[i]]) @ V[...].
 *
 * q, out: [batch, heads, head_dim] contiguous. keys, values: mirror row r, KV head j, position
 * t at r * row_stride + j * head_stride + t * head_dim. Returns 0; -2 without touching anything
 * when a row is outside [0, num_rows) or given twice (each work item writes its own row's
 * head), or a length is outside [1, capacity]; -1 when out of memory.
 */
int dense_decode_attention_f32(const float *restrict q, const float *restrict k, int64_t k_stride,
                               const float *restrict v, int64_t v_stride, float *restrict keys,
                               float *restrict values, const int64_t *restrict rows,
                               const int64_t *restrict lens, float *restrict out, int64_t batch,
                               int64_t heads, int64_t kv_heads, int64_t head_dim,
                               int64_t num_rows, int64_t row_stride, int64_t head_stride,
                               int64_t capacity, float scale, int num_threads) {
    unsigned char *taken = calloc(num_rows > 0 ? num_rows : 1, 1);
    if (taken == NULL) return -1;
    for (int64_t i = 0; i < batch; i++) {
        if (rows[i] < 0 || rows[i] >= num_rows || taken[rows[i]] || lens[i] < 1 ||
            lens[i] > capacity) {
            free(taken);
            return -2;
        }
        taken[rows[i]] = 1;
    }
    free(taken);
    const int64_t group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t allocated = 0;
        float *scores = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < batch * kv_heads; item++) {
            const int64_t i = item / kv_heads, kh = item % kv_heads, n = lens[i];
            if (n * group > allocated) {
                free(scores);
                allocated = 2 * n * group;
                scores = malloc(allocated * sizeof(float));
                if (scores == NULL) {
                    allocated = 0;
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
            }
            float *kr = keys + rows[i] * row_stride + kh * head_stride;
            float *vr = values + rows[i] * row_stride + kh * head_stride;
            memcpy(kr + (n - 1) * head_dim, k + i * k_stride + kh * head_dim,
                   head_dim * sizeof(float));
            memcpy(vr + (n - 1) * head_dim, v + i * v_stride + kh * head_dim,
                   head_dim * sizeof(float));
            const float *qb = q + (i * heads + kh * group) * head_dim;
            for (int64_t t = 0; t < n; t++) {
                const float *kt = kr + t * head_dim;
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
                float *o = out + (i * heads + kh * group + g) * head_dim;
                for (int64_t d = 0; d < head_dim; d++) o[d] = 0.f;
                for (int64_t t = 0; t < n; t++) {
                    const float *vt = vr + t * head_dim, p = s[t] * inv;
                    for (int64_t d = 0; d < head_dim; d++) o[d] += p * vt[d];
                }
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
