// The small per-token operations of the forward pass. Rows are [n, width] row-major f32 unless noted.

// RMSNorm of each row: y = x w / sqrt(mean(x^2) + eps). One block of 256 threads per row.
extern "C" __global__ void __launch_bounds__(256) rms_norm(const float* x, const float* w, float* y, int width, float eps) {
    __shared__ float partial[8];
    const float* xr = x + (long)blockIdx.x * width;
    float* yr = y + (long)blockIdx.x * width;
    float s = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += xr[i] * xr[i];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) total += partial[i];
    const float scale = rsqrtf(total / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

// RoPE on adjacent pairs (2i, 2i + 1) of every head: token t of the n rows is at position pos0 + t and
// pair i turns by (pos0 + t) inv_freq[i], inv_freq[i] = theta^(-2i / head_dim) computed by the host in f64.
// The angle is formed and its sine and cosine taken in f64, as the CPU engine does: at positions in the
// tens of thousands an f32 angle is off by ~1e-3 rad. Grid: one block per token.
extern "C" __global__ void rope(float* v, int width, int head_dim, int pos0, const double* inv_freq) {
    float* row = v + (long)blockIdx.x * width;
    const double pos = (double)(pos0 + blockIdx.x);
    const int half_dim = head_dim / 2;
    for (int p = threadIdx.x; p < width / 2; p += blockDim.x) {
        const int i = p % half_dim;
        double s, c;
        sincos(pos * inv_freq[i], &s, &c);
        const float sf = (float)s, cf = (float)c;
        const float a = row[2 * p], b = row[2 * p + 1];
        row[2 * p] = a * cf - b * sf;
        row[2 * p + 1] = a * sf + b * cf;
    }
}

// gate = silu(gate) * up, elementwise over n values, in place.
extern "C" __global__ void swiglu(float* gate, const float* up, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// x += y, elementwise over n values.
extern "C" __global__ void add_in_place(float* x, const float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] += y[i];
}

// Router: per token (one thread each), softmax over the n_experts logits, the k largest probabilities
// (ties to the lower id), renormalized to sum 1; ids and weights [n, k], highest weight first.
extern "C" __global__ void route_top_k(const float* logits, int n, int n_experts, int k, int* ids, float* weights) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n || n_experts > MAX_EXPERTS) return;
    const float* l = logits + (long)t * n_experts;
    float p[MAX_EXPERTS];
    float mx = NEG_INF;
    for (int e = 0; e < n_experts; e++) mx = fmaxf(mx, l[e]);
    float z = 0.f;
    for (int e = 0; e < n_experts; e++) {
        p[e] = expf(l[e] - mx);
        z += p[e];
    }
    unsigned long long taken = 0;
    float total = 0.f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n_experts; e++) {
            if (!((taken >> e) & 1ull) && (best < 0 || p[e] > p[best])) best = e;
        }
        taken |= 1ull << best;
        ids[t * k + j] = best;
        weights[t * k + j] = p[best] / z;
        total += p[best] / z;
    }
    for (int j = 0; j < k; j++) weights[t * k + j] /= total;
}

// Decode: x[c] += sum_j weights[j] y[j, c] over the k selected experts' outputs y [k, width].
extern "C" __global__ void moe_combine(float* x, const float* y, const float* weights, int k, int width) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < width; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int j = 0; j < k; j++) s += weights[j] * y[(long)j * width + c];
        x[c] += s;
    }
}

// Prompt: x[tokens[i], c] += weights[i] y[i, c] for the m rows one expert produced. A token appears at
// most once per expert, so the rows of one launch never collide. Grid: one block per row.
extern "C" __global__ void scatter_add(float* x, const float* y, const int* tokens, const float* weights, int width) {
    const int i = blockIdx.x;
    float* xr = x + (long)tokens[i] * width;
    const float* yr = y + (long)i * width;
    const float w = weights[i];
    for (int c = threadIdx.x; c < width; c += blockDim.x) xr[c] += w * yr[c];
}

// Appends the keys and values of n tokens ([n, kv_dim] f32) to a layer's f16 cache ([ctx, kv_dim]) at
// position pos0.
extern "C" __global__ void kv_store(const float* k, const float* v, u16* k_cache, u16* v_cache, int kv_dim, int pos0) {
    const long src = (long)blockIdx.x * kv_dim, dst = (long)(pos0 + blockIdx.x) * kv_dim;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        k_cache[dst + c] = f2h(k[src + c]);
        v_cache[dst + c] = f2h(v[src + c]);
    }
}

// Token embeddings: row tokens[t] of the [vocab, width] table, dequantized. One block per token.
template <class T>
__device__ __forceinline__ void embed_row(const u8* table, const int* tokens, float* out, int width) {
    const long row_bytes = (long)(width / T::BLOCK) * T::BYTES;
    const u8* row = table + tokens[blockIdx.x] * row_bytes;
    float* o = out + (long)blockIdx.x * width;
    const int pieces = (width / T::BLOCK) * T::PARTS;
    for (int i = threadIdx.x; i < pieces; i += blockDim.x) {
        const int blk = i / T::PARTS;
        float* ob = o + blk * T::BLOCK;
        T::part(row + (long)blk * T::BYTES, i % T::PARTS, [&](int j, float v) { ob[j] = v; });
    }
}

#define EMBED_KERNEL(T, name)                                                                   \
    extern "C" __global__ void embed_##name(const u8* table, const int* tokens, float* out, int width) { \
        embed_row<T>(table, tokens, out, width);                                                \
    }

FOR_EACH_WEIGHT_TYPE(EMBED_KERNEL)
