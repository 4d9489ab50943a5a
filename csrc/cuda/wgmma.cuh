/*
 * Hopper warpgroup MMA (wgmma) primitives for sm_90a: shared-memory matrix descriptors,
 * the async fences, and D (+)= A * B: m64n64 and m64n128 with A in registers and B in
 * shared memory, m64n128 and m64n256 with both in shared memory.
 *
 * Only valid in the sm_90a compilation pass (TS_SM90A_DEVICE): the kernels that use these
 * call them only there and compile to an empty body elsewhere, and the host never
 * launches them elsewhere (wgmma::available() checks the device and the build).
 *
 * Register layouts are those of mma.m16n8k16 per warp: warp w of the warpgroup owns rows
 * 16w..16w+15 of the 64; accumulator d[i] holds columns 8i..8i+7 (d[i][0..1] row
 * lane/4, columns 2*(lane%4)+{0,1}; d[i][2..3] the same columns of row lane/4 + 8), and
 * an A fragment a[0..3] holds (row lane/4, k 2*(lane%4)), (row + 8), (k + 8), (both).
 * The asm operand lists are spelled out because the instruction names every register;
 * one macro per form and width writes them for both input types.
 */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TS_SM90A_DEVICE 1
#endif

namespace tokenspeed {
namespace cuda {
namespace wgmma {

// Host side: whether this build holds sm_90a machine code (TOKENSPEED_SM90A) and the
// current device is an sm_90 one, so the wgmma kernels can run.
inline bool available() {
#ifdef TOKENSPEED_SM90A
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// Descriptor of a 128-byte-swizzled operand tile in shared memory. The tile is made of
// 8-row x 128-byte atoms (1024-byte aligned); within an atom the 16-byte chunk c of row r
// sits at chunk c ^ (r % 8). lbo/sbo are the byte strides the instruction steps by: for
// a K-major operand sbo is the stride between 8-row groups (lbo unused); for an MN-major
// one lbo steps between 64-element column panels and sbo between 8-row (k) groups.
__device__ __forceinline__ uint64_t sw128_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t d = 0;
  d |= uint64_t((addr >> 4) & 0x3FFF);
  d |= uint64_t((lbo >> 4) & 0x3FFF) << 16;
  d |= uint64_t((sbo >> 4) & 0x3FFF) << 32;
  d |= uint64_t(1) << 62;  // 128-byte swizzle
  return d;
}

// Element offset of (row, col) in a tile stored as 64-column panels of `rows` rows each,
// 128-byte swizzled (16-bit elements); col is a multiple of 8 or any col within a chunk.
template <int kRows>
__device__ __forceinline__ int sw128_offset(int row, int col) {
  const int panel = col >> 6, within = col & 63;
  return panel * kRows * 64 + row * 64 + ((((within >> 3) ^ (row & 7))) << 3) + (within & 7);
}

__device__ __forceinline__ void fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes shared-memory writes of the generic proxy (cp.async, st.shared) visible to the
// async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// After wait(): tells the compiler the accumulators changed here, so no read of them is
// scheduled before the wait.
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// Accumulator operands of the m64nN wgmmas (d[N / 8][4], read and written), in groups
// of 32: their names %0..%31 and %32..%63, and the operands d[0..7] and d[8..15]. One
// pair of NAMES / OPERANDS macros per width serves every form below.
#define TS_WGMMA_NAMES_0_31                                                                        \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define TS_WGMMA_NAMES_32_63                                                                       \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define TS_WGMMA_D_0_7                                                                             \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                      \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                      \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                      \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                      \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                      \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                      \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                      \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define TS_WGMMA_D_8_15                                                                            \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                                      \
  "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                                      \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                                  \
  "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                                  \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                                  \
  "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                                  \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                                  \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define TS_WGMMA_N64_D_NAMES "{" TS_WGMMA_NAMES_0_31 "}, "
#define TS_WGMMA_N64_D_OPERANDS TS_WGMMA_D_0_7
#define TS_WGMMA_N128_D_NAMES "{" TS_WGMMA_NAMES_0_31 "," TS_WGMMA_NAMES_32_63 "}, "
#define TS_WGMMA_N128_D_OPERANDS TS_WGMMA_D_0_7, TS_WGMMA_D_8_15

// One asm statement of the register-A form for input type TY ("bf16" or "f16") and shape
// SHAPE: after the accumulators come a[0..3], desc, scale_d and kTransB, whose operand
// names (numbered after the accumulators') are A_DESC (a, then desc), SCALE and TRANS.
#define TS_WGMMA_RS(TY, SHAPE, D_NAMES, D_OPERANDS, A_DESC, SCALE, TRANS)                          \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                           \
      "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " "                                  \
      D_NAMES A_DESC ", p, 1, 1, " TRANS ";\n}\n"                                                   \
      : D_OPERANDS                                                                                 \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(kTransB))
#define TS_WGMMA_RS_N64(TY)                                                                        \
  TS_WGMMA_RS(TY, "m64n64k16", TS_WGMMA_N64_D_NAMES, TS_WGMMA_N64_D_OPERANDS,                      \
              "{%32, %33, %34, %35}, %36", "%37", "%38")
#define TS_WGMMA_RS_N128(TY)                                                                       \
  TS_WGMMA_RS(TY, "m64n128k16", TS_WGMMA_N128_D_NAMES, TS_WGMMA_N128_D_OPERANDS,                   \
              "{%64, %65, %66, %67}, %68", "%69", "%70")

// D[64 x N] (+)= A[64 x 16] (registers) * B[16 x N] (shared memory, descriptor), N = 64
// or 128: d holds N / 2 accumulators a thread.
template <typename T, int kTransB, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4],
                                        uint64_t desc, int scale_d) {
  static_assert(N == 64 || N == 128, "m64n64 or m64n128");
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && bf16)
    TS_WGMMA_RS_N64("bf16");
  else if constexpr (N == 64)
    TS_WGMMA_RS_N64("f16");
  else if constexpr (bf16)
    TS_WGMMA_RS_N128("bf16");
  else
    TS_WGMMA_RS_N128("f16");
}
#undef TS_WGMMA_RS_N128
#undef TS_WGMMA_RS_N64
#undef TS_WGMMA_RS
#undef TS_WGMMA_N64_D_NAMES
#undef TS_WGMMA_N64_D_OPERANDS

// One asm statement per input type TY ("bf16" or "f16"): D[64 x 128] (+)= A * B with both
// operands K-major in shared memory.
#define TS_WGMMA_SS_N128(TY)                                                                       \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                 \
      TS_WGMMA_N128_D_NAMES                                                                        \
      "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                              \
      : TS_WGMMA_N128_D_OPERANDS                                                                   \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

// D[64 x 128] (+)= A[64 x 16] * B[16 x 128], both from shared memory (K-major descriptors).
template <typename T>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t desc_a,
                                             uint64_t desc_b, int scale_d) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    TS_WGMMA_SS_N128("bf16");
  else
    TS_WGMMA_SS_N128("f16");
}
#undef TS_WGMMA_SS_N128
#undef TS_WGMMA_N128_D_NAMES
#undef TS_WGMMA_N128_D_OPERANDS
#undef TS_WGMMA_NAMES_0_31
#undef TS_WGMMA_NAMES_32_63
#undef TS_WGMMA_D_0_7
#undef TS_WGMMA_D_8_15

// The 128 fp32 accumulators of an m64n256 wgmma (d[32][4]): names %0..%127, operands.
#define TS_WGMMA_N256_D_NAMES                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                         \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"                \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"                \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"                \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"    \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
#define TS_WGMMA_N256_D_OPERANDS                                                                   \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),                                      \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),                                      \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),                                      \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),                                      \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),                                      \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),                                      \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),                                      \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),                                      \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                                      \
  "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),                                      \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),                                  \
  "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),                                  \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),                                  \
  "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),                                  \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),                                  \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]),                                  \
  "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]),                                  \
  "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]),                                  \
  "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]),                                  \
  "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]),                                  \
  "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]),                                  \
  "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]),                                  \
  "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]),                                  \
  "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]),                                  \
  "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]),                                  \
  "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]),                                  \
  "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]),                                  \
  "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]),                                  \
  "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]),                                  \
  "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]),                                  \
  "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]),                                  \
  "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])

// One asm statement per input type TY: D[64 x 256] (+)= A * B, both K-major in shared memory.
#define TS_WGMMA_SS_N256(TY)                                                                       \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " "                                 \
      TS_WGMMA_N256_D_NAMES                                                                        \
      "%128, %129, p, 1, 1, 0, 0;\n}\n"                                                            \
      : TS_WGMMA_N256_D_OPERANDS                                                                   \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d))

// D[64 x 256] (+)= A[64 x 16] * B[16 x 256], both from shared memory (K-major descriptors).
template <typename T>
__device__ __forceinline__ void wgmma_ss_n256(float (&d)[32][4], uint64_t desc_a,
                                             uint64_t desc_b, int scale_d) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    TS_WGMMA_SS_N256("bf16");
  else
    TS_WGMMA_SS_N256("f16");
}
#undef TS_WGMMA_SS_N256
#undef TS_WGMMA_N256_D_NAMES
#undef TS_WGMMA_N256_D_OPERANDS

}  // namespace wgmma
}  // namespace cuda
}  // namespace tokenspeed
