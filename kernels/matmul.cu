// Prompt processing: Y[m, rows] = X[m, cols] W[rows, cols]^T with fused dequantization, on tensor cores.
//
// A block computes a tile of MATMUL_BM = 64 weight rows x MATMUL_BN = 64 tokens. Per step it dequantizes BK values of
// each of its 64 rows into shared memory as f16 (BK = 128, half a K-quant super-block: parts 0-3 of
// Q4_K, Q5_K and Q6_K hold values 0-127 and parts 4-7 values 128-255; 32 values for the other types),
// stages the matching slice of the MATMUL_BN activation rows as f16, and its 4 warps run mma.sync m16n8k8
// (f16 inputs, f32 accumulators; available from sm_75) over it: warp w owns weight rows 16w .. 16w + 15
// and all 64 tokens (eight n8 tiles), so each dequantized weight serves 64 tokens.
//
// `gather` (nullable) selects the activation rows: token i of this product is row gather[i] of X, which
// is how an expert processes only the tokens routed to it. Output rows are compact ([m, rows]).

#define MAX_BK 128
#define PAD 8

__device__ __forceinline__ void mma_16x8x8(float* c, u32 a0, u32 a1, u32 b0) {
#ifdef MIXTRAL_Q_EMULATOR
    emu::mma_m16n8k8_f16_f32(c, a0, a1, b0, __FILE__, __LINE__);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
#endif
}

template <class T>
__device__ __forceinline__ void matmul_tile(const u8* w, const float* x, const int* gather, float* y, int rows,
                                            int cols, int m) {
    const bool half_blocks = T::BLOCK == 256;
    const int BK = half_blocks ? 128 : 32;
    // Pieces (block parts) of one row per step.
    const int PIECES = half_blocks ? T::PARTS / 2 : (32 / T::BLOCK) * T::PARTS;
    const int PITCH = BK + PAD;  // halves per shared row; the padding spreads rows over banks
    __shared__ u16 ws[MATMUL_BM * (MAX_BK + PAD)];
    __shared__ u16 xs[MATMUL_BN * (MAX_BK + PAD)];
    const int r0 = blockIdx.x * MATMUL_BM, t0 = blockIdx.y * MATMUL_BN;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tg = lane & 3;
    const long row_bytes = (long)(cols / T::BLOCK) * T::BYTES;
    float acc[MATMUL_BN / 8][4];
    for (int n = 0; n < MATMUL_BN / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (int k0 = 0; k0 < cols; k0 += BK) {
        for (int i = threadIdx.x; i < MATMUL_BM * PIECES; i += blockDim.x) {
            const int r = i / PIECES, q = i % PIECES;
            const int blk = k0 / T::BLOCK + (half_blocks ? 0 : q / T::PARTS);
            const int p = half_blocks ? ((k0 % 256) / 128) * (T::PARTS / 2) + q : q % T::PARTS;
            // Value j of block `blk` goes to column blk * BLOCK + j - k0 of the tile.
            u16* dst = ws + r * PITCH + (blk * T::BLOCK - k0);
            if (r0 + r < rows) {
                T::part(w + (r0 + r) * row_bytes + (long)blk * T::BYTES, p, [&](int j, float v) { dst[j] = f2h(v); });
            } else {
                T::part(w, p, [&](int j, float) { dst[j] = 0; });
            }
        }
        for (int i = threadIdx.x; i < MATMUL_BN * BK; i += blockDim.x) {
            const int t = i / BK, k = i % BK;
            float v = 0.f;
            if (t0 + t < m) {
                const long src = gather ? gather[t0 + t] : t0 + t;
                v = x[src * cols + k0 + k];
            }
            xs[t * PITCH + k] = f2h(v);
        }
        __syncthreads();
        const u16* wa = ws + (16 * warp) * PITCH;
        for (int kk = 0; kk < BK; kk += 8) {
            const u32 a0 = *(const u32*)(wa + g * PITCH + kk + 2 * tg);
            const u32 a1 = *(const u32*)(wa + (g + 8) * PITCH + kk + 2 * tg);
#pragma unroll
            for (int n = 0; n < MATMUL_BN / 8; n++) {
                const u32 b0 = *(const u32*)(xs + (8 * n + g) * PITCH + kk + 2 * tg);
                mma_16x8x8(acc[n], a0, a1, b0);
            }
        }
        __syncthreads();
    }
    // Accumulator layout: c0, c1 = (row g, tokens 2tg, 2tg + 1); c2, c3 = (row g + 8, same tokens).
#pragma unroll
    for (int n = 0; n < MATMUL_BN / 8; n++) {
        for (int i = 0; i < 4; i++) {
            const int r = r0 + 16 * warp + g + (i >> 1) * 8;
            const int t = t0 + 8 * n + 2 * tg + (i & 1);
            if (r < rows && t < m) y[(long)t * rows + r] = acc[n][i];
        }
    }
}

#define MATMUL_KERNEL(T, name)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        matmul_##name(const u8* w, const float* x, const int* gather, float* y, int rows, int cols, int m) { \
        matmul_tile<T>(w, x, gather, y, rows, cols, m);                                                     \
    }

FOR_EACH_WEIGHT_TYPE(MATMUL_KERNEL)
