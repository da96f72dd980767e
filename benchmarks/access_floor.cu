// What the memory system allows, independent of any rotary kernel: the time of the ideal access pattern of
// an in-place partial rotation (read and write only the rotating 16-byte chunks of each half-row, nothing
// else), relative to a copy of all the bytes. No arithmetic, one 16-byte chunk per thread, neighbouring
// chunks on neighbouring lanes. If the ideal pattern cannot go below X times a copy, no rotary kernel can.
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/access_floor benchmarks/access_floor.cu && /tmp/access_floor
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e = (x);                                                                      \
    if (e != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

__global__ void copy_all(const uint4* __restrict__ src, uint4* __restrict__ dst, unsigned n) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = src[i];
}

// Rows of `chunks` 16-byte chunks; the first `k` chunks of each half-row are touched. mode 0: read and
// write back (what an in-place rotation does), 1: read only, 2: write only. `key` is 0 at run time, so the
// data stays as it is, but the compiler cannot drop the accesses.
__global__ void touch(uint4* buf, unsigned rows, unsigned chunks, unsigned k, unsigned key, int mode) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned row = i / (2 * k), j = i - row * 2 * k;
  if (row >= rows) return;
  uint4* p = buf + static_cast<size_t>(row) * chunks + (j >= k ? chunks / 2 + j - k : j);
  if (mode == 2) {
    *p = make_uint4(key, key, key, key);
    return;
  }
  uint4 v = *p;
  v.x ^= key;
  if (mode == 0) {
    *p = v;
  } else if (v.x == 0x7f7f7f7fu && v.y == key + 1 && v.z == 0x12345u) {  // never true for these data
    buf[0] = v;
  }
}

template <typename F>
float time_us(F launch, int iters = 20, int repeats = 7) {
  for (int i = 0; i < 3; ++i) launch();
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int r = 0; r < repeats; ++r) {
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < iters; ++i) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1e3f / iters);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  int sms = 0, clock_khz = 0, bus_bits = 0;  // what the posenc kernel plans its launches by (device_plan)
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, 0));
  CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, 0));
  const double peak = 2e-6 * clock_khz * bus_bits / 8;  // GB/s, double data rate
  std::printf("%s: %d multiprocessors, memory %d MHz x %d bits = %.0f GB/s peak (%.1f per multiprocessor)\n",
              prop.name, sms, clock_khz / 1000, bus_bits, peak, peak / sms);
  // bf16 rows: D=128 (256 B, 16 chunks), Llama q+k of B=4 S=4096 (40 heads); D=512 (1 KiB), Gemma 4 (9 heads)
  struct Shape { const char* name; unsigned row_bytes, rows; std::vector<unsigned> ks; };
  const Shape shapes[] = {{"D=128 bf16, 4x4096x40 rows", 256, 4 * 4096 * 40, {8, 7, 6, 5, 4, 3, 2}},
                          {"D=512 bf16, 4x4096x9 rows", 1024, 4 * 4096 * 9, {32, 16, 8}}};
  const int threads = 256;
  for (const Shape& s : shapes) {
    const unsigned chunks = s.row_bytes / 16, n = s.rows * chunks;
    uint4 *src, *dst;
    CHECK(cudaMalloc(&src, size_t(n) * 16));
    CHECK(cudaMalloc(&dst, size_t(n) * 16));
    CHECK(cudaMemset(src, 1, size_t(n) * 16));
    const float copy = time_us([&] { copy_all<<<(n + threads - 1) / threads, threads>>>(src, dst, n); });
    const float memcpy = time_us([&] { CHECK(cudaMemcpyAsync(dst, src, size_t(n) * 16, cudaMemcpyDeviceToDevice)); });
    std::printf("\n%s, %.0f MB: copy kernel %.1f us (%.0f GB/s), cudaMemcpy %.2fx\n", s.name, n * 16e-6, copy,
                2.0 * n * 16 / copy * 1e-3, memcpy / copy);
    std::printf("%-28s %10s %10s %10s\n", "touched per half-row", "read+write", "read only", "write only");
    for (unsigned k : s.ks) {
      const unsigned m = s.rows * 2 * k;
      float t[3];
      for (int mode = 0; mode < 3; ++mode) {
        t[mode] = time_us([&] { touch<<<(m + threads - 1) / threads, threads>>>(src, s.rows, chunks, k, 0u, mode); });
      }
      char label[64];
      std::snprintf(label, sizeof label, "%u of %u B (%.3f)", k * 16, s.row_bytes / 2, 2.0 * k / chunks);
      std::printf("%-28s %9.3fx %9.3fx %9.3fx   (x copy)\n", label, t[0] / copy, t[1] / copy, t[2] / copy);
    }
    CHECK(cudaGetLastError());
    CHECK(cudaFree(src));
    CHECK(cudaFree(dst));
  }
  return 0;
}
