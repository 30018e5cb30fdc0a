/* RMSNorm of the CPU engine, with the residual add fused: one pass over each row instead of
 * the five torch makes (add, square, mean, scale, weight). Float32 only; built and loaded by
 * kernels/native.py. Numerics as Hugging Face's LlamaRMSNorm up to the order of the sum.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* h = x (+ residual, stored to new_residual); out = weight * h / sqrt(mean(h^2) + eps).
 * x, residual: rows at x_stride, residual_stride floats apart; out, new_residual contiguous.
 */
void rms_norm_f32(const float *restrict x, int64_t x_stride, const float *restrict residual,
                  int64_t residual_stride, const float *restrict weight, float *restrict out,
                  float *restrict new_residual, int64_t rows, int64_t hidden, float eps,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * hidden > 32768)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * hidden;
        const float *h = xr;
        if (residual != NULL) {
            const float *res = residual + r * residual_stride;
            float *nr = new_residual + r * hidden;
            for (int64_t i = 0; i < hidden; i++) nr[i] = xr[i] + res[i];
            h = nr;
        }
        float sum = 0.f;
        for (int64_t i = 0; i < hidden; i++) sum += h[i] * h[i];
        const float inv = 1.f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) o[i] = weight[i] * (h[i] * inv);
    }
}
