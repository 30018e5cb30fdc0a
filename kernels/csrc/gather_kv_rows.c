/* Fills rows of the CPU engine's dense KV mirror (engine/dense_kv.py) from the paged cache:
 * every layer of every sequence that starts decoding in one call, each position copied once,
 * instead of a gather into a temporary and a copy per sequence. Any element type; built and
 * loaded by kernels/native.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Sequence i's positions [0, lens[i]), read through its block table (tables + i * table_width:
 * position t is offset t % block_size of block tables[t / block_size]), go to mirror row
 * rows[i]; the row's positions [lens[i], capacity) are zeroed. cache: [layers, 2, num_blocks,
 * kv_heads, block_size, head_dim]; mirror: [layers, 2, num_rows, kv_heads, capacity, head_dim];
 * both contiguous. Returns 0, or -1 without writing anything when a row, a length or a block
 * id it would read is out of range, or a row is given twice; -2 when out of memory. */
int gather_kv_rows(const char *cache, char *mirror, const int64_t *tables, int64_t table_width,
                   const int64_t *lens, const int64_t *rows, int64_t n, int64_t layers,
                   int64_t num_blocks, int64_t kv_heads, int64_t block_size, int64_t head_dim,
                   int64_t num_rows, int64_t capacity, int64_t elem_size, int num_threads) {
    unsigned char *taken = calloc(num_rows > 0 ? num_rows : 1, 1);
    if (taken == NULL) return -2;
    for (int64_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= num_rows || taken[rows[i]] || lens[i] < 0 ||
            lens[i] > capacity || lens[i] > table_width * block_size) {
            free(taken);
            return -1;
        }
        taken[rows[i]] = 1;
        for (int64_t b = 0; b < (lens[i] + block_size - 1) / block_size; b++)
            if (tables[i * table_width + b] < 0 || tables[i * table_width + b] >= num_blocks) {
                free(taken);
                return -1;
            }
    }
    free(taken);
    const size_t token = head_dim * elem_size;
    const int64_t items = n * layers * 2 * kv_heads;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t item = 0; item < items; item++) {
        const int64_t i = item / (layers * 2 * kv_heads), rest = item % (layers * 2 * kv_heads);
        const int64_t plane = rest / kv_heads, h = rest % kv_heads; /* plane: layer * 2 + k/v */
        const int64_t len = lens[i];
        char *dst = mirror + (((plane * num_rows + rows[i]) * kv_heads + h) * capacity) * token;
        for (int64_t t0 = 0; t0 < len; t0 += block_size) {
            const int64_t block = tables[i * table_width + t0 / block_size];
            const int64_t m = len - t0 < block_size ? len - t0 : block_size;
            const char *src =
                cache + (((plane * num_blocks + block) * kv_heads + h) * block_size) * token;
            memcpy(dst + t0 * token, src, m * token);
        }
        memset(dst + len * token, 0, (capacity - len) * token);
    }
    return 0;
}
