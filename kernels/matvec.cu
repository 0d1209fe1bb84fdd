// Decode matrix-vector products with fused dequantization: y[r] = sum_c W[r, c] x[c].
//
// One warp per weight row (MATVEC_ROWS_PER_WARP rows per warp, MATVEC_WARPS warps per block). The activation vector
// is staged once per block in shared memory (dynamic; padded, see `padded`), then each lane walks the parts of
// the row's blocks (part i of the row = block i / PARTS, piece i % PARTS), so the 32 lanes of a warp read
// 32 consecutive pieces of the row; partial sums meet in a warp-shuffle reduction.
//
// matvec_<type>:         one matrix.
// matvec_experts_<type>: the selected experts of a layer in one launch; blockIdx.y = selection slot,
//                        the expert id comes from device memory (the router's output), its weights from a
//                        per-layer table of device pointers, so the host never waits for the router.


// The activations sit in shared memory with one padding float after every 32 (index i at i + i / 32):
// the lanes of a warp read values whose indices differ by multiples of 16 or 32 (same position in
// different parts and blocks), which without padding fall into few of the 32 banks (16-way conflicts
// for Q4_K/Q5_K/Q8_0, 8-way for Q6_K, 32-way for Q4_0); with it at most 2-way for Q4_K/Q5_K, 4-way for
// Q6_K, none for the 32-value and float types. Shared memory needed: (cols + cols / 32) floats.
__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

template <class T>
__device__ __forceinline__ void matvec_block(const u8* w, const float* x, float* y, int rows, int cols) {
    extern __shared__ float xs[];
    for (int i = threadIdx.x; i < cols; i += blockDim.x) xs[padded(i)] = x[i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long row_bytes = (long)(cols / T::BLOCK) * T::BYTES;
    const int pieces = (cols / T::BLOCK) * T::PARTS;
    for (int k = 0; k < MATVEC_ROWS_PER_WARP; k++) {
        const int r = (blockIdx.x * MATVEC_WARPS + warp) * MATVEC_ROWS_PER_WARP + k;
        if (r >= rows) return;
        const u8* row = w + r * row_bytes;
        float acc = 0.f;
        for (int i = lane; i < pieces; i += 32) {
            const int blk = i / T::PARTS, x0 = blk * T::BLOCK;
            T::part(row + (long)blk * T::BYTES, i % T::PARTS, [&](int j, float v) { acc += v * xs[padded(x0 + j)]; });
        }
        acc = warp_sum(acc);
        if (lane == 0) y[r] = acc;
    }
}

#define MATVEC_KERNELS(T, name)                                                                            \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * 32)                                               \
        matvec_##name(const u8* w, const float* x, float* y, int rows, int cols) {                         \
        matvec_block<T>(w, x, y, rows, cols);                                                              \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * 32) matvec_experts_##name(                        \
        const u64* expert_ptrs, const int* ids, const float* x, long x_stride, float* y, int rows, int cols) { \
        const int slot = blockIdx.y;                                                                       \
        const u8* w = (const u8*)expert_ptrs[ids[slot]];                                                   \
        matvec_block<T>(w, x + slot * x_stride, y + (long)slot * rows, rows, cols);                        \
    }

FOR_EACH_WEIGHT_TYPE(MATVEC_KERNELS)
