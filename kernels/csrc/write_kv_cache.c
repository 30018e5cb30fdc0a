/* Stores a step's new keys and values at their cache slots, for the CPU engine: one call for
 * every token and head instead of torch's index arithmetic and two scatter ops. Any element
 * type (the caller checks the tensors agree on it); built and loaded by kernels/native.py.
 */
#include <stdint.h>
#include <string.h>

/* Token t's head h (at k + t * k_stride + h * head_stride elements, likewise v) goes to slot
 * slots[t] of the caches: block slot / block_size, offset slot % block_size, at
 * block * cache_block_stride + h * cache_head_stride + offset * head_dim. Negative slots are
 * skipped. Returns 0, or -1 without writing anything when a slot is num_slots or more. */
int write_kv_cache(const char *k, int64_t k_stride, const char *v, int64_t v_stride,
                   int64_t head_stride, char *k_cache, char *v_cache, int64_t cache_block_stride,
                   int64_t cache_head_stride, const int64_t *slots, int64_t tokens,
                   int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t num_slots,
                   int64_t elem_size, int num_threads) {
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] >= num_slots) return -1;
    const size_t row = head_dim * elem_size;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens > 256)
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slots[t];
        if (slot < 0) continue;
        const int64_t at = (slot / block_size) * cache_block_stride + (slot % block_size) * head_dim;
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t dst = (at + h * cache_head_stride) * elem_size;
            memcpy(k_cache + dst, k + (t * k_stride + h * head_stride) * elem_size, row);
            memcpy(v_cache + dst, v + (t * v_stride + h * head_stride) * elem_size, row);
        }
    }
    return 0;
}
