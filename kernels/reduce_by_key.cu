// Deterministic segment sum of gradient rows by unique key: the CUDA twin of
// damo_hybrid/ops/cpu.py:reduce_by_key. Rows of one key are added in their original order,
// starting from 0.0f, exactly as the CPU twin (np.add.at) does, so the results are bit-equal.
extern "C" __global__ void reduce_by_key(const float* __restrict__ grads, const long long* __restrict__ order,
                                         const long long* __restrict__ starts, long long n_unique, int dim,
                                         float* __restrict__ out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_unique * dim) return;
    long long u = i / dim;
    int col = (int)(i % dim);
    float acc = 0.0f;
    for (long long j = starts[u]; j < starts[u + 1]; ++j) acc += grads[order[j] * dim + col];
    out[i] = acc;
}
