// Causal grouped-query attention over the f16 KV cache, split over the sequence (flash-decoding).
//
// attention_partial_*: grid (n_kv_heads, n_chunks, n_tokens), 4 warps per block. Query token t (at
// position pos0 + t) sees cache positions 0 ..= pos0 + t; chunk c covers positions c*chunk .. +chunk.
// The block serves the `group` = n_heads / n_kv_heads query heads that read its KV head: warp w takes
// positions w, w + 4, ... of the chunk, each lane holds head_dim / 32 consecutive dimensions, and every
// warp keeps an online softmax (running max, sum, weighted values) per query head. The warps then merge
// in shared memory and the block writes its chunk's (max, sum, values) per head.
// attention_merge: grid (n_heads, n_tokens); merges the chunks of one head: out = sum_c e^(m_c - M) acc_c /
// sum_c e^(m_c - M) l_c.
// The same pair serves decode (n_tokens = 1, many chunks) and prompts (many tokens, few chunks).
// Limits checked by the host: head_dim 32, 64, 128 or 256; group <= 8.


// MAXG: the largest group this instantiation serves (the runtime group may be smaller); PL: head_dim / 32.
// Both are compile-time so that the per-lane arrays stay in registers.
template <int MAXG, int PL>
__device__ __forceinline__ void attention_partial_impl(const float* q, const u16* k_cache, const u16* v_cache,
                                                       float* part_acc, float* part_ml, int n_heads, int n_kv_heads,
                                                       int pos0, int chunk, float scale) {
    const int head_dim = 32 * PL;
    const int kvh = blockIdx.x, c = blockIdx.y, t = blockIdx.z, n_chunks = gridDim.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = n_heads / n_kv_heads, kv_dim = n_kv_heads * head_dim;
    const int seen = pos0 + t + 1;
    const int p_begin = c * chunk, p_end = min(seen, p_begin + chunk);

    float qr[MAXG][PL], acc[MAXG][PL], m[MAXG], l[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < PL; i++) {
            acc[g][i] = 0.f;
            qr[g][i] = g < group ? q[((long)t * n_heads + kvh * group + g) * head_dim + lane * PL + i] * scale : 0.f;
        }
    }
    for (int p = p_begin + warp; p < p_end; p += ATT_WARPS) {
        const u16* kp = k_cache + (long)p * kv_dim + kvh * head_dim + lane * PL;
        const u16* vp = v_cache + (long)p * kv_dim + kvh * head_dim + lane * PL;
        float kr[PL], vr[PL];
#pragma unroll
        for (int i = 0; i < PL; i++) {
            kr[i] = h2f(kp[i]);
            vr[i] = h2f(vp[i]);
        }
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < group) {
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < PL; i++) s += qr[g][i] * kr[i];
                s = warp_sum(s);
                const float m_new = fmaxf(m[g], s);
                const float correction = expf(m[g] - m_new), w = expf(s - m_new);
                l[g] = l[g] * correction + w;
#pragma unroll
                for (int i = 0; i < PL; i++) acc[g][i] = acc[g][i] * correction + w * vr[i];
                m[g] = m_new;
            }
        }
    }

    // Merge the warps: each writes its state, then one warp per head combines them.
    __shared__ float s_ml[ATT_WARPS][MAXG][2];
    __shared__ float s_acc[ATT_WARPS][MAXG][32 * PL];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (lane == 0) {
            s_ml[warp][g][0] = m[g];
            s_ml[warp][g][1] = l[g];
        }
#pragma unroll
        for (int i = 0; i < PL; i++) s_acc[warp][g][lane * PL + i] = acc[g][i];
    }
    __syncthreads();
    for (int g = warp; g < group; g += ATT_WARPS) {
        float mx = NEG_INF;
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, s_ml[w][g][0]);
        const long head = ((long)t * n_heads + kvh * group + g) * n_chunks + c;
        float sum = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
            if (s_ml[w][g][0] > NEG_INF) sum += expf(s_ml[w][g][0] - mx) * s_ml[w][g][1];
        }
        for (int d = lane; d < head_dim; d += 32) {
            float v = 0.f;
            for (int w = 0; w < ATT_WARPS; w++) {
                if (s_ml[w][g][0] > NEG_INF) v += expf(s_ml[w][g][0] - mx) * s_acc[w][g][d];
            }
            part_acc[head * head_dim + d] = v;
        }
        if (lane == 0) {
            part_ml[2 * head] = mx;
            part_ml[2 * head + 1] = sum;
        }
    }
}

// attention_partial_g<MAXG>_d<head_dim>: the host picks the smallest MAXG >= n_heads / n_kv_heads.
#define ATTENTION_PARTIAL(G, PL, HD)                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_partial_g##G##_d##HD(                 \
        const float* q, const u16* k_cache, const u16* v_cache, float* part_acc, float* part_ml, int n_heads,   \
        int n_kv_heads, int pos0, int chunk, float scale) {                                                     \
        attention_partial_impl<G, PL>(q, k_cache, v_cache, part_acc, part_ml, n_heads, n_kv_heads, pos0, chunk, \
                                      scale);                                                                   \
    }
#define ATTENTION_PARTIAL_DIMS(G) \
    ATTENTION_PARTIAL(G, 1, 32)   \
    ATTENTION_PARTIAL(G, 2, 64)   \
    ATTENTION_PARTIAL(G, 4, 128)  \
    ATTENTION_PARTIAL(G, 8, 256)
ATTENTION_PARTIAL_DIMS(1)
ATTENTION_PARTIAL_DIMS(2)
ATTENTION_PARTIAL_DIMS(4)
ATTENTION_PARTIAL_DIMS(8)

extern "C" __global__ void attention_merge(const float* part_acc, const float* part_ml, float* out, int n_heads,
                                           int head_dim, int n_chunks) {
    const int h = blockIdx.x, t = blockIdx.y;
    const long base = ((long)t * n_heads + h) * n_chunks;
    float mx = NEG_INF;
    for (int c = 0; c < n_chunks; c++) mx = fmaxf(mx, part_ml[2 * (base + c)]);
    float z = 0.f;
    for (int c = 0; c < n_chunks; c++) {
        const float mc = part_ml[2 * (base + c)];
        if (mc > NEG_INF) z += expf(mc - mx) * part_ml[2 * (base + c) + 1];
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float v = 0.f;
        for (int c = 0; c < n_chunks; c++) {
            const float mc = part_ml[2 * (base + c)];
            if (mc > NEG_INF) v += expf(mc - mx) * part_acc[(base + c) * head_dim + d];
        }
        out[((long)t * n_heads + h) * head_dim + d] = v / z;
    }
}
