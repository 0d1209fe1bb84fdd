// Decode matrix-vector products with fused dequantization: y[r] = sum_c W[r, c] x[c].
//
// One warp per weight row (ROWS_PER_WARP rows per warp, WARPS warps per block). The activation vector
// is staged once per block in shared memory (dynamic: cols floats), then each lane walks the parts of
// the row's blocks (part i of the row = block i / PARTS, piece i % PARTS), so the 32 lanes of a warp read
// 32 consecutive pieces of the row; partial sums meet in a warp-shuffle reduction.
//
// matvec_<type>:         one matrix.
// matvec_experts_<type>: the selected experts of a layer in one launch; blockIdx.y = selection slot,
//                        the expert id comes from device memory (the router's output), its weights from a
//                        per-layer table of device pointers, so the host never waits for the router.

#define WARPS 8
#define ROWS_PER_WARP 2

template <class T>
__device__ __forceinline__ void matvec_block(const u8* w, const float* x, float* y, int rows, int cols) {
    extern __shared__ float xs[];
    for (int i = threadIdx.x; i < cols; i += blockDim.x) xs[i] = x[i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long row_bytes = (long)(cols / T::BLOCK) * T::BYTES;
    const int pieces = (cols / T::BLOCK) * T::PARTS;
    for (int k = 0; k < ROWS_PER_WARP; k++) {
        const int r = (blockIdx.x * WARPS + warp) * ROWS_PER_WARP + k;
        if (r >= rows) return;
        const u8* row = w + r * row_bytes;
        float acc = 0.f;
        for (int i = lane; i < pieces; i += 32) {
            const int blk = i / T::PARTS;
            const float* xb = xs + blk * T::BLOCK;
            T::part(row + (long)blk * T::BYTES, i % T::PARTS, [&](int j, float v) { acc += v * xb[j]; });
        }
        acc = warp_sum(acc);
        if (lane == 0) y[r] = acc;
    }
}

#define MATVEC_KERNELS(T, name)                                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                               \
        matvec_##name(const u8* w, const float* x, float* y, int rows, int cols) {                         \
        matvec_block<T>(w, x, y, rows, cols);                                                              \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) matvec_experts_##name(                        \
        const u64* expert_ptrs, const int* ids, const float* x, long x_stride, float* y, int rows, int cols) { \
        const int slot = blockIdx.y;                                                                       \
        const u8* w = (const u8*)expert_ptrs[ids[slot]];                                                   \
        matvec_block<T>(w, x + slot * x_stride, y + (long)slot * rows, rows, cols);                        \
    }

FOR_EACH_WEIGHT_TYPE(MATVEC_KERNELS)
