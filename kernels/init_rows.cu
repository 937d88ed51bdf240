// Deterministic row initialisation: the CUDA twin of damo_hybrid/initializers.py.
// Keep in sync with that module: constants, counters and the Box-Muller halves must match.

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define INV24 (1.0 / 16777216.0)

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27; x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

__device__ __forceinline__ unsigned long long bits_of(unsigned long long base, long long counter) {
    return mix64(base + (unsigned long long)(counter + 1) * GOLDEN);
}

__device__ __forceinline__ double normal_of(unsigned long long h) {
    double u1 = ((double)(h >> 40) + 0.5) * INV24;
    double u2 = ((double)((h >> 16) & 0xFFFFFFULL) + 0.5) * INV24;
    return sqrt(-2.0 * log(u1)) * cos(2.0 * 3.141592653589793 * u2);
}

// kind: 2 uniform(a=low, b=high), 3 normal(a=mean, b=std), 4 truncated normal(a=mean, b=std), 5 xavier(b=bound)
extern "C" __global__ void init_rows(const unsigned long long* __restrict__ keys, long long n, int dim,
                                     unsigned long long salt, int kind, double a, double b,
                                     int trunc_rounds, float* __restrict__ out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * dim) return;
    long long row = i / dim;
    int col = (int)(i % dim);
    unsigned long long base = mix64(keys[row] ^ salt);
    double v;
    if (kind == 2 || kind == 5) {
        unsigned long long h = bits_of(base, col);
        double u = ((double)(h >> 40) + 0.5) * INV24;
        v = (kind == 2) ? a + (b - a) * u : -b + 2.0 * b * u;
    } else {
        double z = normal_of(bits_of(base, col));
        if (kind == 4) {
            for (int r = 1; r < trunc_rounds && fabs(z) > 2.0; ++r)
                z = normal_of(bits_of(base, (long long)r * dim + col));
            z = fmin(fmax(z, -2.0), 2.0);
        }
        v = a + b * z;
    }
    out[i] = (float)v;
}
