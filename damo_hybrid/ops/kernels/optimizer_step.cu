// Fused row-wise optimizer steps: the CUDA twins of damo_hybrid/rows/optimizers.py (RowOptimizer).
// One thread per (row, column). w: (n, dim); s: (n, width) optimizer state; g: (n, dim);
// count: (n,) update count including this step. Built with --fmad=false so that the float32
// arithmetic rounds like the numpy twin's.

extern "C" __global__ void sgd_step(float* w, const float* g, long long n, int dim, float lr, float wd) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * dim) return;
    float gi = g[i];
    if (wd != 0.0f) gi = gi + wd * w[i];
    w[i] = w[i] - lr * gi;
}

// clr: per-row lr / (1 + (count - 1) * lr_decay), computed on the host side in float64 then
// rounded to float32, as the CPU twin does.
extern "C" __global__ void adagrad_step(float* w, float* s, const float* g, const float* clr,
                                        long long n, int dim, float wd, float eps) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * dim) return;
    long long row = i / dim;
    float gi = g[i];
    if (wd != 0.0f) gi = gi + wd * w[i];
    float acc = s[i] + gi * gi;
    s[i] = acc;
    w[i] = w[i] - clr[row] * gi / (sqrtf(acc) + eps);
}

// One thread per row: the row's mean squared gradient feeds a single accumulator.
extern "C" __global__ void rowwise_adagrad_step(float* w, float* s, const float* g, const float* clr,
                                                long long n, int dim, float wd, float eps) {
    long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    float* wr = w + row * dim;
    const float* gr = g + row * dim;
    float sum = 0.0f;
    for (int c = 0; c < dim; ++c) {
        float gi = gr[c];
        if (wd != 0.0f) gi = gi + wd * wr[c];
        sum += gi * gi;
    }
    float acc = s[row] + sum / (float)dim;
    s[row] = acc;
    float denom = sqrtf(acc) + eps;
    for (int c = 0; c < dim; ++c) {
        float gi = gr[c];
        if (wd != 0.0f) gi = gi + wd * wr[c];
        wr[c] = wr[c] - clr[row] * gi / denom;
    }
}

// Adam and AdamW. step_size = lr / (1 - b1^t) and bc2 = sqrt(1 - b2^t) per row, from the host.
extern "C" __global__ void adam_step(float* w, float* s, const float* g, const float* step_size,
                                     const float* bc2, long long n, int dim, float lr, float wd,
                                     float one_m_b1, float b2, float one_m_b2, float eps, int decoupled) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * dim) return;
    long long row = i / dim;
    int col = (int)(i % dim);
    float* m = s + row * 2 * dim + col;
    float* v = m + dim;
    float wi = w[i];
    float gi = g[i];
    if (decoupled) {
        if (wd != 0.0f) wi = wi * (1.0f - lr * wd);
    } else if (wd != 0.0f) {
        gi = gi + wd * wi;
    }
    float mi = *m + one_m_b1 * (gi - *m);
    float vi = *v * b2;
    vi = vi + one_m_b2 * gi * gi;
    *m = mi;
    *v = vi;
    float denom = sqrtf(vi) / bc2[row] + eps;
    w[i] = wi - step_size[row] * mi / denom;
}

// FTRL-proximal; state is z then n.
extern "C" __global__ void ftrl_step(float* w, float* s, const float* g, long long n, int dim,
                                     float alpha, float beta, float l1, float l2) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * dim) return;
    long long row = i / dim;
    int col = (int)(i % dim);
    float* z = s + row * 2 * dim + col;
    float* nn = z + dim;
    float gi = g[i];
    float n_new = *nn + gi * gi;
    float sigma = (sqrtf(n_new) - sqrtf(*nn)) / alpha;
    float zi = *z + (gi - sigma * w[i]);
    *z = zi;
    *nn = n_new;
    if (fabsf(zi) <= l1) {
        w[i] = 0.0f;
    } else {
        float sgn = zi > 0.0f ? 1.0f : -1.0f;
        float denom = (beta + sqrtf(n_new)) / alpha + l2;
        w[i] = -(zi - sgn * l1) / denom;
    }
}

extern "C" __global__ void lion_step(float* w, float* s, const float* g, long long n, int dim,
                                     float lr, float wd, float b1, float one_m_b1, float b2, float one_m_b2) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * dim) return;
    float m = s[i];
    float gi = g[i];
    float c = b1 * m + one_m_b1 * gi;
    float upd = (c > 0.0f) ? 1.0f : ((c < 0.0f) ? -1.0f : 0.0f);
    if (wd != 0.0f) upd = upd + wd * w[i];
    w[i] = w[i] - lr * upd;
    m = m * b2;
    s[i] = m + one_m_b2 * gi;
}
