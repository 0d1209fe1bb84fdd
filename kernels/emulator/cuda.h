// The CUDA that kernels/*.cu see when the CPU emulator compiles them as ordinary C++ (g++, for the tests;
// see scheduler.cpp for how a launch runs and tests/emulator/ for the build). It is force-included before
// the kernel source, and MIXTRAL_Q_EMULATOR selects the few guarded alternatives in the kernels
// (PTX asm: the f16 conversions and mma.sync).
//
// What is emulated: the thread hierarchy (threadIdx, blockIdx, blockDim, gridDim), __syncthreads, the
// warp shuffles, mma.sync m16n8k8 (f16 inputs, f32 accumulators), shared memory and the math functions
// the kernels call. Every CUDA thread is a fiber; a block's fibers run in a random order between sync
// points, and a sync point that not every thread it names reaches is an error.
//
// Shared memory: the build rewrites each `__shared__ T name[N];` into
// `auto& name = emu::shared<T[N], __COUNTER__>();` and `extern __shared__ T name[];` into
// `T* const name = emu::dynamic_shared<T>();`: every block gets its own heap allocation of exactly the
// declared (or launched) size, filled with 0xFF bytes (NaN as floats), so that AddressSanitizer reports an
// access outside it and a read before any write shows up as NaN.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define MIXTRAL_Q_EMULATOR 1

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;
// CUDA's vector types are aligned to their size: UBSan reports a 16-byte load from an address that is not
// 16-byte aligned, which is a misaligned-address fault on the GPU.
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(8) float2 {
    float x, y;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace emu {

// What the kernel code reads of the thread running now (the scheduler's fiber extends it).
struct ThreadState {
    uint3 thread_idx;
};
extern ThreadState* current;
extern uint3 block_idx, block_dim, grid_dim;

void syncthreads(const char* file, int line);

enum ShuffleKind { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

// D = A B + C for one warp: A 16x8 (f16, row-major fragments a0, a1), B 8x8 (f16, column fragment b0),
// C and D 16x8 f32 (c[0..3]), with the fragment layout of PTX's mma.sync.aligned.m16n8k8.row.col.
void mma_m16n8k8_f16_f32(float* c, uint32_t a0, uint32_t a1, uint32_t b0, const char* file, int line);

// The current block's allocation of static shared variable `tag` (`bytes` long), made on first use.
void* block_shared(const void* tag, size_t bytes);
// The current block's dynamic shared memory (the launch's size).
void* dynamic_shared_memory();

template <class T, int Site>
T& shared() {
    static const char tag = 0;
    return *static_cast<T*>(block_shared(&tag, sizeof(T)));
}

template <class T>
T* dynamic_shared() {
    return static_cast<T*>(dynamic_shared_memory());
}

// IEEE binary16 conversions with round-to-nearest-even, as cvt.f32.f16 and cvt.rn.f16.f32 (f16 → f32
// from a table of all 65536 values: the hottest conversion, exact either way).
extern const float* const f16_values;
inline float f16_to_f32(uint16_t h) { return f16_values[h]; }
inline uint16_t f32_to_f16(float f) {
    const _Float16 v = (_Float16)f;
    uint16_t h;
    std::memcpy(&h, &v, 2);
    return h;
}

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32

#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)

template <class T>
inline T emu_shuffle(emu::ShuffleKind kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = emu::shuffle(kind, mask, bits, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    return emu_shuffle(emu::SHFL_IDX, mask, v, src_lane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    return emu_shuffle(emu::SHFL_UP, mask, v, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    return emu_shuffle(emu::SHFL_DOWN, mask, v, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    return emu_shuffle(emu::SHFL_XOR, mask, v, lane_mask, width, file, line);
}

// Device math: the host's libm (results may differ from the GPU's in the last bits; see the README).
using std::max;
using std::min;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}

// Registers a kernel (an extern "C" function of kernels/*.cu) under its name; the build appends one line
// per name that src/engine/cuda/kernels.rs lists, so a listed kernel that does not exist fails to compile.
namespace emu {
void register_kernel(const char* name, void* fn, void (*invoke)(void*, void* const*), int n_params,
                     const uint32_t* kinds, const uint32_t* sizes, const uint32_t* pointee_sizes);

// Parameter kinds, as the launch passes them (tests/emulator/device.rs).
enum ParamKind : uint32_t { PARAM_POINTER = 0, PARAM_INTEGER = 1, PARAM_FLOAT = 2 };

template <class P>
constexpr uint32_t param_kind() {
    return std::is_pointer<P>::value ? PARAM_POINTER : std::is_floating_point<P>::value ? PARAM_FLOAT : PARAM_INTEGER;
}
template <class P>
constexpr uint32_t pointee_size() {
    if constexpr (std::is_pointer<P>::value) {
        using T = typename std::remove_pointer<P>::type;
        if constexpr (std::is_void<T>::value) {
            return 0;
        } else {
            return sizeof(T);
        }
    } else {
        return 0;
    }
}

template <class... P, size_t... I>
void call_kernel(void (*f)(P...), void* const* args, std::index_sequence<I...>) {
    f(*static_cast<const P*>(args[I])...);
}

template <class... P>
void invoke_kernel(void* fn, void* const* args) {
    call_kernel(reinterpret_cast<void (*)(P...)>(fn), args, std::index_sequence_for<P...>{});
}

template <class... P>
struct KernelRegistration {
    KernelRegistration(const char* name, void (*f)(P...)) {
        static const uint32_t kinds[] = {param_kind<P>()..., 0};
        static const uint32_t sizes[] = {(uint32_t)sizeof(P)..., 0};
        static const uint32_t pointees[] = {pointee_size<P>()..., 0};
        register_kernel(name, reinterpret_cast<void*>(f), &invoke_kernel<P...>, (int)sizeof...(P), kinds, sizes,
                        pointees);
    }
};
}  // namespace emu

#define EMU_REGISTER_KERNEL(name) static emu::KernelRegistration emu_registration_##name(#name, name);
