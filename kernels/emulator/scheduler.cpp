// The CPU emulator's launch: runs a kernel of kernels/*.cu (compiled as C++ against cuda.h) block by
// block, every CUDA thread of a block as a fiber on the calling OS thread. Blocks run in a random order;
// inside a block the scheduler resumes a random runnable fiber, which runs until its next sync point
// (__syncthreads, a warp shuffle, an mma), so any order a GPU could pick between sync points may occur.
// A sync point completes when every thread it names has reached it; it is an error (reported with the
// kernel, block, thread and source line) when
//   - a thread exits or waits at __syncthreads while other threads of its block wait at a different one
//     or have exited: a barrier reached by only part of the block, or divergent __syncthreads;
//   - a warp operation names a lane that has exited, waits at a barrier or at a different warp operation,
//     does not exist (a partial warp), or reads a lane outside its mask (inactive lanes);
//   - static shared memory exceeds 48 KiB or static + dynamic exceeds the device's per-block limit.
// Out-of-bounds and misaligned accesses are AddressSanitizer's and UBSan's (the test build enables both).
//
// One launch at a time per process (a mutex): a block's shared memory and the fibers are process-wide.
// The C interface at the end is what tests/emulator/device.rs calls.

#include "cuda.h"

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

// EMU_ASAN: the kernels are built with AddressSanitizer (this file is not: it is not under test, and its
// loops are the emulator's hot path), so every stack switch is announced to ASan.
#if defined(__SANITIZE_ADDRESS__) && !defined(EMU_ASAN)
#define EMU_ASAN 1
#endif
#ifdef EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

ThreadState* current = nullptr;
uint3 block_idx, block_dim, grid_dim;

static const float* make_f16_values() {
    static float values[65536];
    for (uint32_t h = 0; h < 65536; h++) {
        _Float16 v;
        const uint16_t bits = (uint16_t)h;
        std::memcpy(&v, &bits, 2);
        values[h] = (float)v;
    }
    return values;
}
const float* const f16_values = make_f16_values();

namespace {

// ---- contexts: a stack pointer and a 40-line switch on x86-64, ucontext elsewhere ----

#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

}  // namespace
}  // namespace emu

extern "C" __attribute__((visibility("hidden"), noreturn)) void emu_fiber_main();

#if defined(__x86_64__)
// emu_switch_stack(save, load): pushes the callee-saved registers, stores the stack pointer in *save,
// continues on stack `load` by popping the registers saved there and returning. A new fiber's stack is
// prepared (see `start`) so that this return lands in emu_fiber_trampoline.
extern "C" void emu_switch_stack(void** save, void* load);
extern "C" void emu_fiber_trampoline();
asm(R"(
    .text
    .globl emu_switch_stack
    .hidden emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack

    .globl emu_fiber_trampoline
    .hidden emu_fiber_trampoline
    .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
    xorl %ebp, %ebp
    andq $-16, %rsp
    call emu_fiber_main
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
#endif

namespace emu {
namespace {

const size_t STACK_BYTES = 256 << 10;
const size_t GUARD_BYTES = 4096;
const size_t STATIC_SHARED_LIMIT = 48 << 10;
const int MAX_THREADS = 1024;

enum class State { Runnable, AtBarrier, AtWarpOp, Done };
enum class WarpOp { Shuffle, Mma };

const char* shuffle_name(ShuffleKind k) {
    switch (k) {
        case SHFL_IDX: return "__shfl_sync";
        case SHFL_UP: return "__shfl_up_sync";
        case SHFL_DOWN: return "__shfl_down_sync";
        default: return "__shfl_xor_sync";
    }
}

// What a lane brings to a warp operation and what it gets back.
struct WarpCall {
    WarpOp op;
    ShuffleKind shuffle;
    unsigned mask;
    int arg, width;
    uint64_t value, result;
    uint32_t a0, a1, b0;
    float c[4];
    const char* file;
    int line;

    std::string where() const {
        char buf[256];
        if (op == WarpOp::Mma) {
            snprintf(buf, sizeof buf, "mma.sync m16n8k8 at %s:%d", file, line);
        } else {
            snprintf(buf, sizeof buf, "%s(mask 0x%08x) at %s:%d", shuffle_name(shuffle), mask, file, line);
        }
        return buf;
    }
};

struct Fiber : ThreadState {
    Context ctx;
    char* stack = nullptr;  // lowest usable byte (a guard page lies below)
    int linear = 0;
    State state = State::Runnable;
    const char* barrier_file = nullptr;
    int barrier_line = 0;
    WarpCall call{};
    void* fake_stack = nullptr;
    // Started and not finished cleanly: its stack may hold poisoned frames of an abandoned run.
    bool dirty = false;

    int lane() const { return linear & 31; }
    int warp() const { return linear >> 5; }
};

struct Kernel {
    std::string name;
    void* fn;
    void (*invoke)(void*, void* const*);
    int n_params;
    const uint32_t *kinds, *sizes, *pointees;
};

std::vector<Kernel>& registry() {
    static std::vector<Kernel> kernels;
    return kernels;
}

// ---- state of the launch in progress (guarded by g_mutex) ----

std::mutex g_mutex;
std::vector<std::unique_ptr<Fiber>> g_fibers;
Context g_scheduler;
#ifdef EMU_ASAN
void* g_scheduler_fake_stack = nullptr;
const void* g_scheduler_stack_bottom = nullptr;
size_t g_scheduler_stack_size = 0;
#endif
const Kernel* g_kernel = nullptr;
void* const* g_args = nullptr;
int g_threads = 0;
std::vector<int> g_runnable;
int g_at_barrier = 0, g_done = 0;
// Per warp of the block: lanes waiting at a warp operation, lanes that exited, lanes at the barrier.
struct WarpLanes {
    unsigned at_op, done, at_barrier;
};
std::vector<WarpLanes> g_warps;
std::string g_error;
uint64_t g_rng = 1;
size_t g_dynamic_bytes = 0, g_shared_limit = 0, g_static_bytes = 0;
void* g_dynamic = nullptr;
struct StaticShared {
    const void* tag;
    void* memory;
};
std::vector<StaticShared> g_static;

uint64_t next_random() {
    // xorshift64*
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 2685821657736338717ull;
}

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

std::string thread_name(const Fiber* f) {
    return format("thread (%u,%u,%u) (warp %d lane %d)", f->thread_idx.x, f->thread_idx.y, f->thread_idx.z,
                  f->warp(), f->lane());
}

void fail(const std::string& message) {
    if (g_error.empty()) g_error = message;
}

Fiber* self() { return static_cast<Fiber*>(current); }

// ---- switching ----

void switch_context(Context& from, Context& to) {
#if defined(__x86_64__)
    emu_switch_stack(&from.sp, to.sp);
#else
    swapcontext(&from.uc, &to.uc);
#endif
}

// Scheduler → fiber f; returns when f reaches a sync point or ends.
void resume(Fiber* f) {
    current = f;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&g_scheduler_fake_stack, f->stack, STACK_BYTES);
#endif
    switch_context(g_scheduler, f->ctx);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(g_scheduler_fake_stack, nullptr, nullptr);
#endif
}

// Fiber → scheduler, in `state`; returns when the scheduler resumes this fiber.
void yield(Fiber* f, State state) {
    f->state = state;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, g_scheduler_stack_bottom, g_scheduler_stack_size);
#endif
    switch_context(f->ctx, g_scheduler);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

// From inside a fiber: records the error and leaves the fiber for good.
[[noreturn]] void fail_here(const std::string& message) {
    fail(message);
    Fiber* f = self();
    yield(f, State::Done);
    abort();  // the scheduler never resumes a fiber after an error
}

// Prepares fiber f to run the kernel from its start.
void start(Fiber* f) {
    if (!f->stack) {
        void* base = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                          -1, 0);
        if (base == MAP_FAILED) {
            fprintf(stderr, "emulator: cannot map a fiber stack\n");
            abort();
        }
        mprotect(base, GUARD_BYTES, PROT_NONE);  // a stack overflow faults instead of corrupting memory
        f->stack = static_cast<char*>(base) + GUARD_BYTES;
    }
#ifdef EMU_ASAN
    // A run abandoned at an error leaves the poisoned redzones of its frames behind.
    if (f->dirty) __asan_unpoison_memory_region(f->stack, STACK_BYTES);
    f->fake_stack = nullptr;
#endif
    f->dirty = true;
#if defined(__x86_64__)
    uint64_t* top = reinterpret_cast<uint64_t*>(f->stack + STACK_BYTES);
    top[-1] = 0;                                               // alignment slot
    top[-2] = reinterpret_cast<uint64_t>(&emu_fiber_trampoline);  // where emu_switch_stack returns
    for (int i = 3; i <= 8; i++) top[-i] = 0;                  // rbp rbx r12 r13 r14 r15
    f->ctx.sp = &top[-8];
#else
    getcontext(&f->ctx.uc);
    f->ctx.uc.uc_stack.ss_sp = f->stack;
    f->ctx.uc.uc_stack.ss_size = STACK_BYTES;
    f->ctx.uc.uc_link = nullptr;
    makecontext(&f->ctx.uc, reinterpret_cast<void (*)()>(&emu_fiber_main), 0);
#endif
    f->state = State::Runnable;
}

// ---- sync points ----

// Lanes of warp w that exist in a block of g_threads threads.
unsigned present_lanes(int w) {
    const int n = g_threads - 32 * w;
    return n >= 32 ? 0xffffffffu : (1u << n) - 1;
}

Fiber* lane_fiber(int warp, int lane) { return g_fibers[32 * warp + lane].get(); }

void make_runnable(Fiber* f) {
    f->state = State::Runnable;
    g_runnable.push_back(f->linear);
}

// f stops taking part in warp operations (it exited or waits at a barrier, as `what` says): an error
// when a lane of its warp waits for it.
void check_no_lane_waits_for(const Fiber* f) {
    for (unsigned waiting = g_warps[f->warp()].at_op; waiting; waiting &= waiting - 1) {
        const Fiber* g = lane_fiber(f->warp(), __builtin_ctz(waiting));
        if ((g->call.mask >> f->lane()) & 1) {
            const std::string what = f->state == State::Done
                                         ? std::string("has exited")
                                         : format("waits at __syncthreads() at %s:%d", f->barrier_file, f->barrier_line);
            fail(format("%s waits at %s for lane %d, which %s: a warp operation with inactive lanes",
                        thread_name(g).c_str(), g->call.where().c_str(), f->lane(), what.c_str()));
            return;
        }
    }
}

void on_exit(Fiber* f) {
    g_done++;
    g_warps[f->warp()].done |= 1u << f->lane();
    if (g_at_barrier > 0) {
        for (int t = 0; t < g_threads; t++) {
            const Fiber* p = g_fibers[t].get();
            if (p->state == State::AtBarrier) {
                fail(format("%s exited while %s waits at __syncthreads() at %s:%d: a barrier reached by only "
                            "part of the block",
                            thread_name(f).c_str(), thread_name(p).c_str(), p->barrier_file, p->barrier_line));
                return;
            }
        }
    }
    check_no_lane_waits_for(f);
}

void on_barrier(Fiber* f) {
    if (g_done > 0) {
        for (int t = 0; t < g_threads; t++) {
            const Fiber* p = g_fibers[t].get();
            if (p->state == State::Done) {
                fail(format("%s reached __syncthreads() at %s:%d, which %s exited without reaching: a barrier "
                            "reached by only part of the block",
                            thread_name(f).c_str(), f->barrier_file, f->barrier_line, thread_name(p).c_str()));
                return;
            }
        }
    }
    check_no_lane_waits_for(f);
    g_warps[f->warp()].at_barrier |= 1u << f->lane();
    if (!g_error.empty() || ++g_at_barrier < g_threads) return;
    const Fiber* first = g_fibers[0].get();
    for (int t = 0; t < g_threads; t++) {
        const Fiber* g = g_fibers[t].get();
        if (g->barrier_line != first->barrier_line ||
            (g->barrier_file != first->barrier_file && strcmp(g->barrier_file, first->barrier_file) != 0)) {
            fail(format("divergent __syncthreads(): %s waits at %s:%d, %s at %s:%d", thread_name(first).c_str(),
                        first->barrier_file, first->barrier_line, thread_name(g).c_str(), g->barrier_file,
                        g->barrier_line));
            return;
        }
    }
    g_at_barrier = 0;
    for (auto& w : g_warps) w.at_barrier = 0;
    for (int t = 0; t < g_threads; t++) make_runnable(g_fibers[t].get());
}

// Source lane of a shuffle by `lane` (CUDA's rules for each kind; `width` splits the warp into segments).
int shuffle_source(const WarpCall& c, int lane) {
    const int base = lane & ~(c.width - 1), pos = lane - base;
    switch (c.shuffle) {
        case SHFL_IDX: return base + (c.arg & (c.width - 1));
        case SHFL_UP: return pos >= c.arg ? lane - c.arg : lane;
        case SHFL_DOWN: return pos + c.arg < c.width ? lane + c.arg : lane;
        default: {
            const int src = lane ^ c.arg;
            return src >= base + c.width ? lane : src;
        }
    }
}

void mma(int warp) {
    float a[16][8], b[8][8], d[16][8];
    auto lo = [](uint32_t v) { return f16_to_f32((uint16_t)(v & 0xFFFF)); };
    auto hi = [](uint32_t v) { return f16_to_f32((uint16_t)(v >> 16)); };
    for (int l = 0; l < 32; l++) {
        const WarpCall& c = lane_fiber(warp, l)->call;
        const int g = l >> 2, t = l & 3;
        a[g][2 * t] = lo(c.a0);
        a[g][2 * t + 1] = hi(c.a0);
        a[g + 8][2 * t] = lo(c.a1);
        a[g + 8][2 * t + 1] = hi(c.a1);
        b[2 * t][g] = lo(c.b0);
        b[2 * t + 1][g] = hi(c.b0);
        d[g][2 * t] = c.c[0];
        d[g][2 * t + 1] = c.c[1];
        d[g + 8][2 * t] = c.c[2];
        d[g + 8][2 * t + 1] = c.c[3];
    }
    // Products of f16 values are exact in f32; they are added to C in f32, k in order (the tensor cores'
    // order and internal precision are unspecified: results may differ from a GPU's in the last bits).
    for (int r = 0; r < 16; r++) {
        for (int k = 0; k < 8; k++) {
            for (int n = 0; n < 8; n++) d[r][n] += a[r][k] * b[k][n];
        }
    }
    for (int l = 0; l < 32; l++) {
        WarpCall& c = lane_fiber(warp, l)->call;
        const int g = l >> 2, t = l & 3;
        c.c[0] = d[g][2 * t];
        c.c[1] = d[g][2 * t + 1];
        c.c[2] = d[g + 8][2 * t];
        c.c[3] = d[g + 8][2 * t + 1];
    }
}

// The lanes of `mask` in warp w are all at a warp operation: checks they are at the same one, then runs it.
void complete_warp_op(int w, const WarpCall& c) {
    for (unsigned lanes = c.mask; lanes; lanes &= lanes - 1) {
        const Fiber* g = lane_fiber(w, __builtin_ctz(lanes));
        if (g->call.mask != c.mask || g->call.op != c.op ||
            (c.op == WarpOp::Shuffle && (g->call.shuffle != c.shuffle || g->call.width != c.width)) ||
            (c.op == WarpOp::Mma &&
             (g->call.line != c.line || (g->call.file != c.file && strcmp(g->call.file, c.file) != 0)))) {
            return fail(format("lanes of warp %d wait at different warp operations: %s at %s, %s at %s", w,
                               thread_name(lane_fiber(w, __builtin_ctz(c.mask))).c_str(), c.where().c_str(),
                               thread_name(g).c_str(), g->call.where().c_str()));
        }
    }
    if (c.op == WarpOp::Mma) {
        mma(w);
    } else {
        for (unsigned lanes = c.mask; lanes; lanes &= lanes - 1) {
            const int l = __builtin_ctz(lanes);
            Fiber* g = lane_fiber(w, l);
            const int src = shuffle_source(g->call, l);
            if (!((c.mask >> src) & 1)) {
                return fail(format("%s: %s reads lane %d, which is not in the mask (undefined on the GPU)",
                                   thread_name(g).c_str(), g->call.where().c_str(), src));
            }
            g->call.result = lane_fiber(w, src)->call.value;
        }
    }
    g_warps[w].at_op &= ~c.mask;
    for (unsigned lanes = c.mask; lanes; lanes &= lanes - 1) make_runnable(lane_fiber(w, __builtin_ctz(lanes)));
}

void on_warp_op(Fiber* f) {
    const WarpCall c = f->call;
    const int w = f->warp();
    WarpLanes& lanes = g_warps[w];
    if (!((c.mask >> f->lane()) & 1)) {
        return fail(format("%s calls %s, whose mask does not name the calling lane", thread_name(f).c_str(),
                           c.where().c_str()));
    }
    if (c.mask & ~present_lanes(w)) {
        return fail(format("%s calls %s, which names lanes a block of %d threads does not have (inactive lanes)",
                           thread_name(f).c_str(), c.where().c_str(), g_threads));
    }
    if (c.mask & lanes.done) {
        return fail(format("%s calls %s, but lane %d has exited (inactive lane)", thread_name(f).c_str(),
                           c.where().c_str(), __builtin_ctz(c.mask & lanes.done)));
    }
    if (c.mask & lanes.at_barrier) {
        const Fiber* g = lane_fiber(w, __builtin_ctz(c.mask & lanes.at_barrier));
        return fail(format("%s calls %s, but lane %d waits at __syncthreads() at %s:%d", thread_name(f).c_str(),
                           c.where().c_str(), g->lane(), g->barrier_file, g->barrier_line));
    }
    lanes.at_op |= 1u << f->lane();
    if ((lanes.at_op & c.mask) == c.mask) complete_warp_op(w, c);
}

void run_block() {
    for (int t = 0; t < g_threads; t++) {
        Fiber* f = g_fibers[t].get();
        start(f);
        f->linear = t;
        f->thread_idx = uint3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
    }
    g_runnable.clear();
    for (int t = 0; t < g_threads; t++) g_runnable.push_back(t);
    g_at_barrier = g_done = 0;
    g_warps.assign((g_threads + 31) / 32, WarpLanes{0, 0, 0});
    g_static_bytes = 0;
    g_dynamic = malloc(g_dynamic_bytes);
    memset(g_dynamic, 0xFF, g_dynamic_bytes);
    while (g_error.empty()) {
        if (g_runnable.empty()) {
            if (g_done != g_threads) fail("deadlock: no thread can continue");
            break;
        }
        const size_t i = next_random() % g_runnable.size();
        Fiber* f = g_fibers[g_runnable[i]].get();
        g_runnable[i] = g_runnable.back();
        g_runnable.pop_back();
        resume(f);
        if (!g_error.empty()) break;
        switch (f->state) {
            case State::Done: on_exit(f); break;
            case State::AtBarrier: on_barrier(f); break;
            case State::AtWarpOp: on_warp_op(f); break;
            case State::Runnable: fail("internal error: a fiber yielded without a reason"); break;
        }
    }
    free(g_dynamic);
    g_dynamic = nullptr;
    for (auto& s : g_static) free(s.memory);
    g_static.clear();
}

}  // namespace

// ---- what kernels call (declared in cuda.h) ----

void syncthreads(const char* file, int line) {
    Fiber* f = self();
    f->barrier_file = file;
    f->barrier_line = line;
    yield(f, State::AtBarrier);
}

uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Fiber* f = self();
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        fail_here(format("%s: %s width %d is not a power of two up to 32 (at %s:%d)", thread_name(f).c_str(),
                         shuffle_name(kind), width, file, line));
    }
    f->call = WarpCall{};
    f->call.op = WarpOp::Shuffle;
    f->call.shuffle = kind;
    f->call.mask = mask;
    f->call.arg = arg;
    f->call.width = width;
    f->call.value = value;
    f->call.file = file;
    f->call.line = line;
    yield(f, State::AtWarpOp);
    return f->call.result;
}

void mma_m16n8k8_f16_f32(float* c, uint32_t a0, uint32_t a1, uint32_t b0, const char* file, int line) {
    Fiber* f = self();
    f->call = WarpCall{};
    f->call.op = WarpOp::Mma;
    f->call.mask = 0xffffffffu;  // .aligned: the whole warp executes the same mma
    f->call.a0 = a0;
    f->call.a1 = a1;
    f->call.b0 = b0;
    for (int i = 0; i < 4; i++) f->call.c[i] = c[i];
    f->call.file = file;
    f->call.line = line;
    yield(f, State::AtWarpOp);
    for (int i = 0; i < 4; i++) c[i] = f->call.c[i];
}

void* block_shared(const void* tag, size_t bytes) {
    for (const auto& s : g_static) {
        if (s.tag == tag) return s.memory;
    }
    g_static_bytes += bytes;
    if (g_static_bytes > STATIC_SHARED_LIMIT) {
        fail_here(format("%zu bytes of static shared memory exceed the 48 KiB a block may declare", g_static_bytes));
    }
    if (g_static_bytes + g_dynamic_bytes > g_shared_limit) {
        fail_here(format("%zu bytes of static and %zu of dynamic shared memory exceed the device's %zu per block",
                         g_static_bytes, g_dynamic_bytes, g_shared_limit));
    }
    void* p = malloc(bytes);
    memset(p, 0xFF, bytes);
    g_static.push_back(StaticShared{tag, p});
    return p;
}

void* dynamic_shared_memory() { return g_dynamic; }

void register_kernel(const char* name, void* fn, void (*invoke)(void*, void* const*), int n_params,
                     const uint32_t* kinds, const uint32_t* sizes, const uint32_t* pointee_sizes) {
    registry().push_back(Kernel{name, fn, invoke, n_params, kinds, sizes, pointee_sizes});
}

}  // namespace emu

using namespace emu;

extern "C" void emu_fiber_main() {
    Fiber* f = self();
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack_bottom, &g_scheduler_stack_size);
#endif
    g_kernel->invoke(g_kernel->fn, g_args);
    f->state = State::Done;
    f->dirty = false;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, g_scheduler_stack_bottom, g_scheduler_stack_size);
#endif
    switch_context(f->ctx, g_scheduler);
    abort();  // a finished fiber is never resumed
}

// ---- the C interface ----

// One kernel argument as the launch passes it: a pointer to its value and what the value is.
struct EmuArg {
    const void* value;
    uint32_t kind;          // ParamKind
    uint32_t size;          // bytes of the value
    uint32_t pointee_size;  // for pointers: bytes of the element type
};

static const char* kind_name(uint32_t kind) {
    return kind == PARAM_POINTER ? "pointer" : kind == PARAM_FLOAT ? "floating-point" : "integer";
}

static int failed(char* error, size_t error_len, const std::string& message) {
    snprintf(error, error_len, "%s", message.c_str());
    return 1;
}

extern "C" int emu_has_kernel(const char* name) {
    for (const auto& k : registry()) {
        if (k.name == name) return 1;
    }
    return 0;
}

// Runs kernel `name` over the grid; 0 on success, else 1 with a message in `error`.
extern "C" int emu_launch(const char* name, const uint32_t grid[3], const uint32_t block[3], uint32_t dynamic_shared,
                          uint32_t shared_limit, const EmuArg* args, uint32_t n_args, uint64_t seed, char* error,
                          size_t error_len) {
    std::lock_guard<std::mutex> lock(g_mutex);
    const Kernel* kernel = nullptr;
    for (const auto& k : registry()) {
        if (k.name == name) kernel = &k;
    }
    if (!kernel) return failed(error, error_len, format("no kernel %s", name));
    if ((int)n_args != kernel->n_params) {
        return failed(error, error_len,
                      format("%s takes %d parameters, the launch passed %u", name, kernel->n_params, n_args));
    }
    std::vector<void*> values(n_args);
    for (uint32_t i = 0; i < n_args; i++) {
        const EmuArg& a = args[i];
        if (a.kind != kernel->kinds[i] || a.size != kernel->sizes[i]) {
            return failed(error, error_len,
                          format("%s parameter %u is a %u-byte %s, the launch passed a %u-byte %s", name, i,
                                 kernel->sizes[i], kind_name(kernel->kinds[i]), a.size, kind_name(a.kind)));
        }
        if (a.kind == PARAM_POINTER && kernel->pointees[i] != 0 && a.pointee_size != kernel->pointees[i]) {
            return failed(error, error_len,
                          format("%s parameter %u points to %u-byte elements, the launch passed a buffer of %u-byte "
                                 "elements",
                                 name, i, kernel->pointees[i], a.pointee_size));
        }
        values[i] = const_cast<void*>(a.value);
    }
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (threads == 0 || threads > MAX_THREADS || block[2] > 64) {
        return failed(error, error_len,
                      format("%s: a block of %ux%ux%u threads is not launchable", name, block[0], block[1], block[2]));
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535 ||
        grid[0] > 0x7fffffffu) {
        return failed(error, error_len,
                      format("%s: a grid of %ux%ux%u blocks is not launchable", name, grid[0], grid[1], grid[2]));
    }
    if (dynamic_shared > shared_limit) {
        return failed(error, error_len,
                      format("%s: %u bytes of dynamic shared memory exceed the device's %u per block", name,
                             dynamic_shared, shared_limit));
    }
    while (g_fibers.size() < threads) {
        g_fibers.push_back(std::make_unique<Fiber>());
    }
    g_kernel = kernel;
    g_args = values.data();
    g_threads = (int)threads;
    g_rng = seed | 1;
    g_dynamic_bytes = dynamic_shared;
    g_shared_limit = shared_limit;
    g_error.clear();
    block_dim = uint3{block[0], block[1], block[2]};
    grid_dim = uint3{grid[0], grid[1], grid[2]};
    // Blocks in a random order: no block may rely on another having run.
    const uint64_t n_blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    std::vector<uint64_t> order(n_blocks);
    for (uint64_t b = 0; b < n_blocks; b++) order[b] = b;
    for (uint64_t b = n_blocks; b > 1; b--) std::swap(order[b - 1], order[next_random() % b]);
    for (uint64_t b : order) {
        block_idx = uint3{(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]),
                          (unsigned)(b / ((uint64_t)grid[0] * grid[1]))};
        run_block();
        if (!g_error.empty()) {
            current = nullptr;
            return failed(error, error_len,
                          format("%s block (%u,%u,%u): %s", name, block_idx.x, block_idx.y, block_idx.z,
                                 g_error.c_str()));
        }
    }
    current = nullptr;
    return 0;
}
