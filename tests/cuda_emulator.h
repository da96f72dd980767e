// Just enough of the CUDA execution model to run csrc/rotary_cuda.cu on the CPU (see cuda_emulator.py):
// a launch runs its blocks one after another on one team of std::threads (one per CUDA thread) that meet at a
// std::barrier for __syncthreads; shared memory is one buffer filled with NaN bytes before each block, so a
// read of anything not written first shows up in the results. Every vector or scalar access the kernel makes
// through its load/store helpers is checked for alignment and, between log_begin and log_end, recorded as
// (address, bytes), so that a test can prove that an in-place call touched only the channels that rotate.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

using std::max;
using std::min;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx, blockDim;
inline thread_local std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }

alignas(64) inline unsigned char emu_smem[1 << 17];
inline std::mutex emu_mutex;
inline std::vector<std::pair<uintptr_t, size_t>> emu_log;  // global accesses: (address, bytes)
inline bool emu_logging = false;
inline long emu_misaligned = 0;  // accesses (shared memory included) not aligned to their type

inline void emu_note(const void* ptr, size_t bytes, size_t align) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t smem = reinterpret_cast<uintptr_t>(emu_smem);
  const bool global = a < smem || a >= smem + sizeof(emu_smem);
  if (a % align == 0 && !(emu_logging && global)) return;  // the common case takes no lock
  std::lock_guard<std::mutex> guard(emu_mutex);
  if (a % align != 0) ++emu_misaligned;
  if (emu_logging && global) emu_log.emplace_back(a, bytes);
}
// reinterpret_cast<Vec<...>*>(p) in the kernel becomes emu_cast<Vec<...>*>(p)
template <class P, class Q>
inline P emu_cast(Q* q) {
  using V = std::remove_cv_t<std::remove_pointer_t<P>>;
  emu_note(q, sizeof(V), alignof(V));
  return reinterpret_cast<P>(q);
}
// row[i] (a strided scalar access) becomes *emu_at(row + i)
template <class T>
inline T* emu_at(T* p) {
  emu_note(p, sizeof(T), alignof(T));
  return p;
}

// The fast path's inline-PTX global load and store of 16 bytes become these
template <class W>
inline void emu_load16(const void* at, W* x) {
  emu_note(at, 16, 16);
  std::memcpy(x, at, 16);
}
template <class W>
inline void emu_store16(void* at, const W* x) {
  emu_note(at, 16, 16);
  std::memcpy(at, x, 16);
}

inline uint32_t __umulhi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((uint64_t{a} * b) >> 32); }

// The bit casts and conversions the kernel takes from CUDA's headers; the roundings are c10's, which CUDA's
// (round to nearest even) equal.
template <class To, class From>
inline To emu_bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}
inline float __uint_as_float(uint32_t u) { return emu_bits<float>(u); }
inline uint32_t __float_as_uint(float f) { return emu_bits<uint32_t>(f); }
inline double __hiloint2double(int hi, int lo) {
  return emu_bits<double>(uint64_t{static_cast<uint32_t>(hi)} << 32 | static_cast<uint32_t>(lo));
}
inline int __double2loint(double d) { return static_cast<int>(emu_bits<uint64_t>(d) & 0xffffffffu); }
inline int __double2hiint(double d) { return static_cast<int>(emu_bits<uint64_t>(d) >> 32); }
struct __half {
  uint16_t x;
};
struct __half2 {
  uint16_t x, y;  // x in the low half of the word, as in CUDA
};
struct __nv_bfloat162 {
  uint16_t x, y;
};
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half2 __floats2half2_rn(float a, float b) { return {c10::Half(a).x, c10::Half(b).x}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {c10::BFloat16(a).x, c10::BFloat16(b).x}; }

namespace c10::cuda {
inline int current_device() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
enum { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMemoryClockRate = 36, cudaDevAttrGlobalMemoryBusWidth = 37 };
// The device a launch plans for (default: an H100, 132 multiprocessors, 2619 MHz x 5120-bit memory). Fewer
// multiprocessors make small inputs take the launch shapes of large ones (whole tokens per block, several
// units per thread); a faster memory gives out-of-place launches more units per thread. Set by set_device.
inline int emu_multiprocessors = 132;
inline int emu_memory_clock_khz = 2619000;
inline int emu_memory_bus_bits = 5120;
inline int cudaDeviceGetAttribute(int* n, int attribute, int) {
  *n = attribute == cudaDevAttrMemoryClockRate        ? emu_memory_clock_khz
       : attribute == cudaDevAttrGlobalMemoryBusWidth ? emu_memory_bus_bits
                                                      : emu_multiprocessors;
  return 0;
}
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0

// kernel<<<grid, block, smem, stream>>>(p, L) becomes emu_launch(kernel, grid, block, smem, p, L). One team
// of std::threads runs the blocks one after another; shared memory is poisoned between blocks.
template <class K, class P, class L>
void emu_launch(K kernel, dim3 grid, dim3 block, size_t smem, const P& p, const L& l) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (smem > sizeof(emu_smem) || smem > 48 * 1024) {
    std::fprintf(stderr, "emu_launch: %zu bytes of shared memory (48 KiB without opting in)\n", smem);
    std::abort();
  }
  if (threads < 1 || threads > 1024) {
    std::fprintf(stderr, "emu_launch: %d threads per block\n", threads);
    std::abort();
  }
  std::barrier<> barrier(threads);
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t) {
    team.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, t / block.x);
      blockDim = block;
      emu_barrier = &barrier;
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          if (t == 0) std::memset(emu_smem, 0xFF, sizeof(emu_smem));  // NaN bytes: unwritten reads show
          barrier.arrive_and_wait();
          blockIdx = dim3(bx, by);
          kernel(p, l);
          barrier.arrive_and_wait();  // the block is done before the next one's poison
        }
      }
    });
  }
  for (auto& th : team) th.join();
}
