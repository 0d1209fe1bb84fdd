// Prepended to every kernel file before NVRTC compiles it (see src/engine/cuda/kernels.rs), so that no
// CUDA header is needed: the few types and conversions the kernels use are written here.
//
// Weight blocks follow ggml's layouts exactly (src/format/codec/ documents each one byte by byte).
// Every block type is a struct with
//   BLOCK  values per block,          BYTES  bytes per block,
//   PARTS  independent pieces of a block; part p reads one contiguous run of quantized bytes,
//   part(b, p, f)  calls f(i, value) for every value i (index within the block) that part p decodes.
// Kernels spread the parts of consecutive blocks over consecutive threads, so a warp's loads are
// coalesced, and reuse the same decoders for dot products (matvec) and for dequantization (matmul tiles,
// embedding rows). Types whose block size is a multiple of 16 bytes (Q4_K, Q5_K, F16, BF16, F32) read
// their quantized bytes with 16-byte loads; the others (Q6_K 210, Q3_K 110, Q2_K 84, Q8_0 34, Q4_0 18,
// Q5_0 22, Q4_1 20, Q5_1 24 bytes) are only 2- or 4-byte aligned inside a row and use 2-byte loads.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

// The f16 conversions are PTX; the CPU emulator (kernels/emulator/cuda.h) has its own.
__device__ __forceinline__ float h2f(u16 h) {
#ifdef MIXTRAL_Q_EMULATOR
    return emu::f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 f2h(float f) {
#ifdef MIXTRAL_Q_EMULATOR
    return emu::f32_to_f16(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float((u32)h << 16); }

// An f16 stored at a 2-byte aligned address.
__device__ __forceinline__ float load_f16(const u8* p) { return h2f(*(const u16*)p); }

// 4 bytes at a 2-byte aligned address.
__device__ __forceinline__ u32 load_u32_a2(const u8* p) {
    const u16* q = (const u16*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}

// 16 bytes at a 16-byte aligned address, as 4 words.
__device__ __forceinline__ uint4 load_16(const u8* p) { return *(const uint4*)p; }

// 16 bytes at a 2-byte aligned address, as 4 words.
__device__ __forceinline__ uint4 load_16_a2(const u8* p) {
    return make_uint4(load_u32_a2(p), load_u32_a2(p + 4), load_u32_a2(p + 8), load_u32_a2(p + 12));
}

__device__ __forceinline__ u32 word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Byte j (0..15) of a 16-byte vector.
__device__ __forceinline__ u32 byte_of(const uint4& v, int j) { return (word(v, j >> 2) >> (8 * (j & 3))) & 0xFF; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- float types: a "block" is 16 bytes of consecutive values ----

struct TF32 {
    static const int BLOCK = 4, BYTES = 16, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const float4 v = *(const float4*)b;
        f(0, v.x); f(1, v.y); f(2, v.z); f(3, v.w);
    }
};

struct TF16 {
    static const int BLOCK = 8, BYTES = 16, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const uint4 v = load_16(b);
        for (int i = 0; i < 4; i++) {
            const u32 w = word(v, i);
            f(2 * i, h2f((u16)(w & 0xFFFF)));
            f(2 * i + 1, h2f((u16)(w >> 16)));
        }
    }
};

struct TBF16 {
    static const int BLOCK = 8, BYTES = 16, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const uint4 v = load_16(b);
        for (int i = 0; i < 4; i++) {
            const u32 w = word(v, i);
            f(2 * i, bf2f((u16)(w & 0xFFFF)));
            f(2 * i + 1, bf2f((u16)(w >> 16)));
        }
    }
};

// ---- 32-value block types ----

// Q4_0: f16 d; 16 bytes qs: byte j = value j (low nibble), value j + 16 (high nibble); x = d(q - 8).
struct TQ4_0 {
    static const int BLOCK = 32, BYTES = 18, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const float d = load_f16(b);
        const uint4 q = load_16_a2(b + 2);
        for (int j = 0; j < 16; j++) {
            const u32 v = byte_of(q, j);
            f(j, d * ((int)(v & 0xF) - 8));
            f(j + 16, d * ((int)(v >> 4) - 8));
        }
    }
};

// Q4_1: f16 d, f16 m; 16 bytes qs as Q4_0; x = d q + m.
struct TQ4_1 {
    static const int BLOCK = 32, BYTES = 20, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const float d = load_f16(b), m = load_f16(b + 2);
        const uint4 q = load_16_a2(b + 4);
        for (int j = 0; j < 16; j++) {
            const u32 v = byte_of(q, j);
            f(j, d * (float)(v & 0xF) + m);
            f(j + 16, d * (float)(v >> 4) + m);
        }
    }
};

// Q5_0: f16 d; u32 qh (bit j = bit 4 of value j); 16 bytes qs as Q4_0; x = d(q - 16).
struct TQ5_0 {
    static const int BLOCK = 32, BYTES = 22, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const float d = load_f16(b);
        const u32 qh = load_u32_a2(b + 2);
        const uint4 q = load_16_a2(b + 6);
        for (int j = 0; j < 16; j++) {
            const u32 v = byte_of(q, j);
            const int lo = (int)((v & 0xF) | (((qh >> j) & 1) << 4));
            const int hi = (int)((v >> 4) | (((qh >> (j + 16)) & 1) << 4));
            f(j, d * (lo - 16));
            f(j + 16, d * (hi - 16));
        }
    }
};

// Q5_1: f16 d, f16 m; u32 qh; 16 bytes qs; x = d q + m.
struct TQ5_1 {
    static const int BLOCK = 32, BYTES = 24, PARTS = 1;
    template <class F> __device__ static void part(const u8* b, int, F&& f) {
        const float d = load_f16(b), m = load_f16(b + 2);
        const u32 qh = *(const u32*)(b + 4);
        const uint4 q = load_16_a2(b + 8);
        for (int j = 0; j < 16; j++) {
            const u32 v = byte_of(q, j);
            const u32 lo = (v & 0xF) | (((qh >> j) & 1) << 4);
            const u32 hi = (v >> 4) | (((qh >> (j + 16)) & 1) << 4);
            f(j, d * (float)lo + m);
            f(j + 16, d * (float)hi + m);
        }
    }
};

// Q8_0: f16 d; 32 x i8; x = d q. Part p holds values 16p .. 16p + 15.
struct TQ8_0 {
    static const int BLOCK = 32, BYTES = 34, PARTS = 2;
    template <class F> __device__ static void part(const u8* b, int p, F&& f) {
        const float d = load_f16(b);
        const uint4 q = load_16_a2(b + 2 + 16 * p);
        for (int j = 0; j < 16; j++) f(16 * p + j, d * (float)(i8)byte_of(q, j));
    }
};

// ---- K-quants: 256-value super-blocks ----

// Sub-block j's 6-bit (scale, min) from the 12 packed bytes (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* s, float& sc, float& m) {
    if (j < 4) {
        sc = (float)(s[j] & 63);
        m = (float)(s[j + 4] & 63);
    } else {
        sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Q4_K: f16 d, f16 dmin, 12 bytes scales, 128 bytes qs. Value 64c + l (c < 4, l < 32) is the low nibble
// of qs[32c + l], value 64c + 32 + l its high nibble; x = d sc q - dmin m of its sub-block of 32.
// Part p (< 8): c = p / 2, l = 16 (p % 2) .. + 16, one 16-byte load of qs.
struct TQ4_K {
    static const int BLOCK = 256, BYTES = 144, PARTS = 8;
    template <class F> __device__ static void part(const u8* b, int p, F&& f) {
        const int c = p >> 1, l0 = (p & 1) * 16;
        const float d = load_f16(b), dmin = load_f16(b + 2);
        float sc1, m1, sc2, m2;
        scale_min_k4(2 * c, b + 4, sc1, m1);
        scale_min_k4(2 * c + 1, b + 4, sc2, m2);
        const float d1 = d * sc1, o1 = dmin * m1, d2 = d * sc2, o2 = dmin * m2;
        const uint4 q = load_16(b + 16 + 32 * c + l0);
        for (int j = 0; j < 16; j++) {
            const u32 v = byte_of(q, j);
            f(64 * c + l0 + j, d1 * (float)(v & 0xF) - o1);
            f(64 * c + 32 + l0 + j, d2 * (float)(v >> 4) - o2);
        }
    }
};

// Q5_K: f16 d, f16 dmin, 12 bytes scales, 32 bytes qh, 128 bytes qs. Value 64c + l has its low 4 bits in
// the low nibble of qs[32c + l] and bit 4 in bit 2c of qh[l]; value 64c + 32 + l the high nibble and
// bit 2c + 1. Parts as Q4_K.
struct TQ5_K {
    static const int BLOCK = 256, BYTES = 176, PARTS = 8;
    template <class F> __device__ static void part(const u8* b, int p, F&& f) {
        const int c = p >> 1, l0 = (p & 1) * 16;
        const float d = load_f16(b), dmin = load_f16(b + 2);
        float sc1, m1, sc2, m2;
        scale_min_k4(2 * c, b + 4, sc1, m1);
        scale_min_k4(2 * c + 1, b + 4, sc2, m2);
        const float d1 = d * sc1, o1 = dmin * m1, d2 = d * sc2, o2 = dmin * m2;
        const uint4 h = load_16(b + 16 + l0);
        const uint4 q = load_16(b + 48 + 32 * c + l0);
        for (int j = 0; j < 16; j++) {
            const u32 v = byte_of(q, j), hb = byte_of(h, j) >> (2 * c);
            f(64 * c + l0 + j, d1 * (float)((v & 0xF) | ((hb & 1) << 4)) - o1);
            f(64 * c + 32 + l0 + j, d2 * (float)((v >> 4) | ((hb & 2) << 3)) - o2);
        }
    }
};

// Q6_K: 128 bytes ql, 64 bytes qh, 16 x i8 scales, f16 d. Value 128h + 32k + l (h < 2, k < 4, l < 32)
// has its low 4 bits in ql[64h + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2) and its high
// 2 bits in bits 2k of qh[32h + l]; x = d scales[i / 16] (q - 32).
// Part p (< 8): h = p / 4, l = 8 (p % 4) .. + 8, all four k: 32 values.
struct TQ6_K {
    static const int BLOCK = 256, BYTES = 210, PARTS = 8;
    template <class F> __device__ static void part(const u8* b, int p, F&& f) {
        const int h = p >> 2, l0 = (p & 3) * 8;
        const float d = load_f16(b + 208);
        const i8* sc = (const i8*)(b + 192);
        const u32 lo_a[2] = {load_u32_a2(b + 64 * h + l0), load_u32_a2(b + 64 * h + l0 + 4)};
        const u32 lo_b[2] = {load_u32_a2(b + 64 * h + 32 + l0), load_u32_a2(b + 64 * h + 32 + l0 + 4)};
        const u32 hi[2] = {load_u32_a2(b + 128 + 32 * h + l0), load_u32_a2(b + 128 + 32 * h + l0 + 4)};
        for (int j = 0; j < 8; j++) {
            const int l = l0 + j;
            const u32 qa = (lo_a[j >> 2] >> (8 * (j & 3))) & 0xFF;
            const u32 qb = (lo_b[j >> 2] >> (8 * (j & 3))) & 0xFF;
            const u32 qh = (hi[j >> 2] >> (8 * (j & 3))) & 0xFF;
            const int q0 = (int)((qa & 0xF) | ((qh & 3) << 4)) - 32;
            const int q1 = (int)((qb & 0xF) | (((qh >> 2) & 3) << 4)) - 32;
            const int q2 = (int)((qa >> 4) | (((qh >> 4) & 3) << 4)) - 32;
            const int q3 = (int)((qb >> 4) | (((qh >> 6) & 3) << 4)) - 32;
            const int base = 128 * h + l, s = 8 * h + (l >> 4);
            f(base, d * sc[s] * q0);
            f(base + 32, d * sc[s + 2] * q1);
            f(base + 64, d * sc[s + 4] * q2);
            f(base + 96, d * sc[s + 6] * q3);
        }
    }
};

// Q2_K: 16 bytes scales (sub-block s: scale low nibble, min high nibble), 64 bytes qs, f16 d, f16 dmin.
// Value 128h + 32k + l (h < 2, k < 4, l < 32) is bits 2k of qs[32h + l], in sub-block 8h + 2k + l / 16;
// x = d sc q - dmin m. Part p (< 8): h = p / 4, l = 8 (p % 4) .. + 8, all four k: 32 values.
struct TQ2_K {
    static const int BLOCK = 256, BYTES = 84, PARTS = 8;
    template <class F> __device__ static void part(const u8* b, int p, F&& f) {
        const int h = p >> 2, l0 = (p & 3) * 8;
        const float d = load_f16(b + 80), dmin = load_f16(b + 82);
        const u32 q[2] = {load_u32_a2(b + 16 + 32 * h + l0), load_u32_a2(b + 16 + 32 * h + l0 + 4)};
        // l0 .. l0 + 8 lie in one half of 16, so one sub-block per k.
        const int s0 = 8 * h + (l0 >> 4);
        for (int k = 0; k < 4; k++) {
            const u32 sm = b[s0 + 2 * k];
            const float dl = d * (float)(sm & 0xF), ml = dmin * (float)(sm >> 4);
            for (int j = 0; j < 8; j++) {
                const u32 v = (q[j >> 2] >> (8 * (j & 3) + 2 * k)) & 3;
                f(128 * h + 32 * k + l0 + j, dl * (float)v - ml);
            }
        }
    }
};
// Q3_K: 32 bytes hmask, 64 bytes qs, 12 bytes scales, f16 d. Value 128h + 32k + l has its low 2 bits in
// bits 2k of qs[32h + l] and its high bit in bit 4h + k of hmask[l] (clear: subtract 4); sub-block
// s = 8h + 2k + l / 16 has the 6-bit scale (lo4 | hi2 << 4) - 32, lo4 the low nibble of scales[s] (s < 8)
// or the high nibble of scales[s - 8], hi2 bits 2(s / 4) of scales[8 + s % 4]; x = d sc q.
// Parts as Q2_K.
struct TQ3_K {
    static const int BLOCK = 256, BYTES = 110, PARTS = 8;
    template <class F> __device__ static void part(const u8* b, int p, F&& f) {
        const int h = p >> 2, l0 = (p & 3) * 8;
        const float d = load_f16(b + 108);
        const u8* sc = b + 96;
        const u32 q[2] = {load_u32_a2(b + 32 + 32 * h + l0), load_u32_a2(b + 32 + 32 * h + l0 + 4)};
        const u32 hm[2] = {load_u32_a2(b + l0), load_u32_a2(b + l0 + 4)};
        const int s0 = 8 * h + (l0 >> 4);
        for (int k = 0; k < 4; k++) {
            const int s = s0 + 2 * k;
            const u32 lo = s < 8 ? (sc[s] & 0xF) : (sc[s - 8] >> 4);
            const u32 hi = (sc[8 + (s & 3)] >> (2 * (s >> 2))) & 3;
            const float dl = d * (float)((int)(lo | (hi << 4)) - 32);
            for (int j = 0; j < 8; j++) {
                const int low = (int)((q[j >> 2] >> (8 * (j & 3) + 2 * k)) & 3);
                const int high = (int)((hm[j >> 2] >> (8 * (j & 3) + 4 * h + k)) & 1);
                f(128 * h + 32 * k + l0 + j, dl * (float)(low - 4 + 4 * high));
            }
        }
    }
};
// FOR_EACH_WEIGHT_TYPE(MACRO), which instantiates MACRO(type struct, kernel-name suffix) for every weight
// type with kernels, and the launch constants (MATVEC_WARPS, MATMUL_BM, ...) are generated from the Rust
// constants of src/engine/cuda/kernels.rs (`constants_header`) and prepended to this file.
