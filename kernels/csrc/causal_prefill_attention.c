/* Causal attention of prompts with no cached prefix over their own keys and values, for the
 * CPU engine's prefill (kernels/fresh_prefill_attention.py). Float32, head_dim a multiple of
 * 16; built and loaded by kernels/native.py.
 *
 * First every KV head's keys and values are packed once: keys as tiles of 32 positions, each
 * [head_dim][32], values as [tokens][head_dim] (both padded to 32 positions with zeros), per
 * KV head and prompt, so the tiles below
 * stream contiguous memory (rows of the fused qkv projection lie kilobytes apart); then one work
 * item per (prompt, KV head, block of BLOCK_ROWS positions): the block's query vectors (every
 * query head of the KV head, so each key tile is read once for all of them) take their scores
 * against the keys before the block's end in register tiles of SCORE_ROWS queries x 32 keys, a
 * softmax per row, then the values in tiles of VALUE_ROWS rows x 64 dims.
 *
 * NOTE: measured on the 2-core EPYC VM (2026-11-30) against torch's SDPA (its flash kernel for
 * CPU, GQA without copies): 16 prompts of 256 tokens, 12/4 heads of 64: 24-25 -> 14.2-14.9 ms;
 * 32 x 128, 4/2 heads: 5.2-5.5 -> 3.2-3.6 ms; 4 x 1,024: 61 -> 44 ms; 2 x 2,048: 68 -> 57 ms;
 * 8 x 512 with 128-dim heads: 122 -> 66 ms. Tiles of 4 x 32 and 4 x 64 (fewer accumulators
 * than the FMA units can keep busy) were 1.2-1.4x slower.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector expf (libmvec), so the softmax's exponentials vectorize without -ffast-math. */
#pragma omp declare simd notinbranch
extern float expf(float);

typedef float v16 __attribute__((vector_size(64)));

#define BLOCK_ROWS 32
#define SCORE_ROWS 12 /* 12 x 2 accumulators of 16 floats */
#define VALUE_ROWS 6 /* 6 x 4 accumulators */

static inline v16 load16(const float *p) {
    v16 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store16(float *p, v16 x) { memcpy(p, &x, sizeof x); }

static inline v16 splat(float x) { return (v16){0} + x; }

/* s[r][j] = scale * q_r . k_j for r < nq (q_r at qs[r]) and j < padded (a multiple of 32);
 * keys come in tiles of 32, each [head_dim][32] contiguous, one after another. */
static void scores(const float *const *qs, int64_t nq, const float *tiles, int64_t padded,
                   int64_t head_dim, float scale, float *s) {
    for (int64_t r0 = 0; r0 < nq; r0 += SCORE_ROWS) {
        const float *q[SCORE_ROWS];
        for (int t = 0; t < SCORE_ROWS; t++) q[t] = qs[r0 + t < nq ? r0 + t : nq - 1];
        for (int64_t j0 = 0; j0 < padded; j0 += 32) {
            const float *tile = tiles + j0 * head_dim;
            v16 a[SCORE_ROWS][2] = {{{0}}};
            for (int64_t d = 0; d < head_dim; d++) {
                const v16 k0 = load16(tile + 32 * d), k1 = load16(tile + 32 * d + 16);
                for (int t = 0; t < SCORE_ROWS; t++) {
                    const v16 x = splat(q[t][d]);
                    a[t][0] += x * k0;
                    a[t][1] += x * k1;
                }
            }
            for (int t = 0; t < SCORE_ROWS && r0 + t < nq; t++) {
                store16(s + (r0 + t) * padded + j0, a[t][0] * scale);
                store16(s + (r0 + t) * padded + j0 + 16, a[t][1] * scale);
            }
        }
    }
}

/* Row r keeps keys [0, visible[r]): exponentials of the rest become 0; returns nothing, and
 * leaves 1 / sum in inv[r]. */
static void softmax_rows(float *s, int64_t nq, int64_t padded, const int64_t *visible,
                         float *inv) {
    for (int64_t r = 0; r < nq; r++) {
        float *row = s + r * padded, top = -FLT_MAX, sum = 0.f;
        const int64_t n = visible[r];
        for (int64_t j = 0; j < n; j++) top = row[j] > top ? row[j] : top;
        for (int64_t j = 0; j < n; j++) {
            row[j] = expf(row[j] - top);
            sum += row[j];
        }
        for (int64_t j = n; j < padded; j++) row[j] = 0.f;
        inv[r] = 1.f / sum;
    }
}

/* The tile of `weighted_values`: ROWS rows x CHUNKS * 16 dims, sizes the compiler knows, so
 * the accumulators stay in registers. */
#define VALUES_TILE(ROWS, CHUNKS)                                                        \
    do {                                                                                 \
        v16 a[ROWS][CHUNKS] = {{{0}}};                                                   \
        for (int64_t j = 0; j < nk; j++) {                                               \
            const float *vj = v + j * head_dim + d0;                                     \
            v16 x[CHUNKS];                                                               \
            for (int c = 0; c < CHUNKS; c++) x[c] = load16(vj + 16 * c);                 \
            for (int t = 0; t < ROWS; t++) {                                             \
                const v16 w = splat(p[(r0 + t) * padded + j]);                           \
                for (int c = 0; c < CHUNKS; c++) a[t][c] += w * x[c];                    \
            }                                                                            \
        }                                                                                \
        for (int t = 0; t < ROWS; t++)                                                   \
            for (int c = 0; c < CHUNKS; c++)                                             \
                store16(outs[r0 + t] + d0 + 16 * c, a[t][c] * inv[r0 + t]);              \
    } while (0)

/* out_r = inv[r] * sum_j p[r][j] v_j over j < nk (v_j at v + j * head_dim), for r < nq. */
static void weighted_values(const float *p, const float *inv, int64_t nq, int64_t padded,
                            int64_t nk, const float *v, int64_t head_dim, float *const *outs) {
    for (int64_t r0 = 0; r0 < nq; r0 += VALUE_ROWS) {
        for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
            if (nq - r0 >= VALUE_ROWS && head_dim - d0 >= 64) {
                VALUES_TILE(VALUE_ROWS, 4);
                continue;
            }
            /* the edges: one row and one 16-wide chunk at a time */
            const int64_t d_end = head_dim - d0 < 64 ? head_dim : d0 + 64;
            const int64_t r_end = nq - r0 < VALUE_ROWS ? nq : r0 + VALUE_ROWS;
            for (int64_t r = r0; r < r_end; r++)
                for (int64_t d1 = d0; d1 < d_end; d1 += 16) {
                    v16 a = {0};
                    for (int64_t j = 0; j < nk; j++)
                        a += splat(p[r * padded + j]) * load16(v + j * head_dim + d1);
                    store16(outs[r] + d1, a * inv[r]);
                }
        }
    }
}

/* Prompt i is tokens [starts[i], starts[i] + lens[i]) of q [T, heads, head_dim], k and v
 * [T, kv_heads, head_dim] (rows q_stride, k_stride, v_stride floats apart, heads contiguous);
 * out is [T, heads, head_dim] contiguous. Returns 0, or -1 when out of memory. */
int causal_prefill_attention_f32(const float *q, int64_t q_stride, const float *k,
                                 int64_t k_stride, const float *v, int64_t v_stride,
                                 const int64_t *starts, const int64_t *lens, int64_t prompts,
                                 float *out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                 float scale, int num_threads) {
    const int64_t group = heads / kv_heads, nq_max = BLOCK_ROWS * group;
    /* prompt i: blocks of queries [first_block[i], first_block[i + 1]), key tiles likewise */
    int64_t *first_block = malloc((prompts + 1) * sizeof(int64_t));
    int64_t *first_tile = malloc((prompts + 1) * sizeof(int64_t));
    if (first_block == NULL || first_tile == NULL) {
        free(first_block);
        free(first_tile);
        return -1;
    }
    first_block[0] = first_tile[0] = 0;
    for (int64_t i = 0; i < prompts; i++) {
        first_block[i + 1] = first_block[i] + (lens[i] + BLOCK_ROWS - 1) / BLOCK_ROWS;
        first_tile[i + 1] = first_tile[i] + (lens[i] + 31) / 32;
    }
    const int64_t tiles = first_tile[prompts], tile_size = 32 * head_dim;
    float *kp = malloc(kv_heads * tiles * tile_size * sizeof(float));
    float *vp = malloc(kv_heads * tiles * tile_size * sizeof(float));
    if (kp == NULL || vp == NULL) {
        free(first_block);
        free(first_tile);
        free(kp);
        free(vp);
        return -1;
    }
    const int64_t items = first_block[prompts] * kv_heads;
    int failed = 0; /* set by a thread that runs out of memory; the others stop taking work */
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t pair = 0; pair < kv_heads * tiles; pair++) {
            const int64_t kh = pair / tiles, tile = pair % tiles;
            int64_t p = 0;
            while (first_tile[p + 1] <= tile) p++;
            const int64_t j0 = (tile - first_tile[p]) * 32;
            float *kd = kp + pair * tile_size, *vd = vp + pair * tile_size;
            const int64_t n = lens[p] - j0 < 32 ? lens[p] - j0 : 32;
            memset(kd, 0, tile_size * sizeof(float));
            memset(vd + n * head_dim, 0, (32 - n) * head_dim * sizeof(float));
            for (int64_t j = 0; j < n; j++) {
                const int64_t t = starts[p] + j0 + j;
                const float *kr = k + t * k_stride + kh * head_dim;
                memcpy(vd + head_dim * j, v + t * v_stride + kh * head_dim, head_dim * sizeof(float));
                for (int64_t d = 0; d < head_dim; d++) kd[32 * d + j] = kr[d];
            }
        }
        int64_t capacity = 0;
        float *s = NULL;
        const float **qs = malloc(nq_max * sizeof(float *));
        float **outs = malloc(nq_max * sizeof(float *));
        float *inv = malloc(nq_max * sizeof(float));
        int64_t *visible = malloc(nq_max * sizeof(int64_t));
        if (qs == NULL || outs == NULL || inv == NULL || visible == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            int stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            const int64_t kh = item % kv_heads, block = item / kv_heads;
            int64_t lo = 0, hi = prompts - 1; /* the prompt holding this block */
            while (lo < hi) {
                const int64_t mid = (lo + hi + 1) / 2;
                if (first_block[mid] <= block) lo = mid;
                else hi = mid - 1;
            }
            const int64_t start = starts[lo], i0 = (block - first_block[lo]) * BLOCK_ROWS;
            const int64_t i1 = i0 + BLOCK_ROWS < lens[lo] ? i0 + BLOCK_ROWS : lens[lo];
            const int64_t nk = i1, padded = (nk + 31) / 32 * 32, nq = (i1 - i0) * group;
            if (padded > capacity) {
                free(s);
                capacity = 2 * padded;
                s = malloc(nq_max * capacity * sizeof(float));
                if (s == NULL) {
                    capacity = 0;
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
            }
            for (int64_t r = 0; r < nq; r++) {
                const int64_t i = i0 + r / group, h = kh * group + r % group;
                qs[r] = q + (start + i) * q_stride + h * head_dim;
                outs[r] = out + ((start + i) * heads + h) * head_dim;
                visible[r] = i + 1;
            }
            const int64_t at = (kh * tiles + first_tile[lo]) * tile_size;
            scores(qs, nq, kp + at, padded, head_dim, scale, s);
            softmax_rows(s, nq, padded, visible, inv);
            weighted_values(s, inv, nq, padded, nk, vp + at, head_dim, outs);
        }
        free(s);
        free(qs);
        free(outs);
        free(inv);
        free(visible);
    }
    free(first_block);
    free(first_tile);
    free(kp);
    free(vp);
    return failed ? -1 : 0;
}
