/* Rotary position embedding of the CPU engine: q and k rotated in one pass each, reading the
 * cos/sin row of each token's position in place (the torch reference gathers the rows, then
 * makes six passes per tensor). Float32 only; built and loaded by kernels/native.py.
 *
 * Bit for bit the reference (and Hugging Face's apply_rotary_pos_emb): products rounded
 * before the sum, never fused into one multiply-add.
 */
#pragma GCC optimize("fp-contract=off") /* GCC */
#pragma STDC FP_CONTRACT OFF /* clang */
#include <stdint.h>

/* x: [tokens, heads, head_dim] at (token_stride, head_dim) floats; out: contiguous.
 * cos_sin: [positions, head_dim], cos in the first half of a row, sin in the second.
 */
static void rotate(const float *restrict x, int64_t token_stride, float *restrict out,
                   int64_t heads, int64_t head_dim, const float *restrict cos_sin, int64_t t) {
    const int64_t half = head_dim / 2;
    const float *restrict c = cos_sin, *restrict s = cos_sin + half;
    for (int64_t h = 0; h < heads; h++) {
        const float *x1 = x + t * token_stride + h * head_dim, *x2 = x1 + half;
        float *o1 = out + (t * heads + h) * head_dim, *o2 = o1 + half;
        for (int64_t i = 0; i < half; i++) {
            o1[i] = x1[i] * c[i] - x2[i] * s[i];
            o2[i] = x2[i] * c[i] + x1[i] * s[i];
        }
    }
}

/* Returns 0, or -1 without writing anything when a position is outside [0, num_positions). */
int rotary_embedding_f32(const float *restrict q, int64_t q_stride, const float *restrict k,
                         int64_t k_stride, const int64_t *restrict positions,
                         const float *restrict cos_sin, int64_t num_positions,
                         float *restrict q_out, float *restrict k_out, int64_t tokens,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, int num_threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= num_positions) return -1;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens > 64)
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = cos_sin + positions[t] * head_dim;
        rotate(q, q_stride, q_out, heads, head_dim, row, t);
        rotate(k, k_stride, k_out, kv_heads, head_dim, row, t);
    }
    return 0;
}
