// Argument checks of the moe ops, shared by the CPU and CUDA backends (see op_checks.h
// for the conventions: each message names the argument and the offending value).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace tokenspeed {

// The CUDA router keeps one row of probabilities per warp in shared memory and the
// chosen ids in registers: these bound E and k.
constexpr int64_t kMaxExperts = 2048;
constexpr int64_t kMaxRoutedExperts = 32;

// logits [T, E] float with unit stride along E; 1 <= top_k <= min(E, kMaxRoutedExperts);
// forced (if given) int32 [T, top_k] on logits' device. validate: every forced row is
// either all -1 (free) or all in [0, E) (one host copy of forced).
void check_moe_route(const at::Tensor& logits, int64_t top_k,
                     const std::optional<at::Tensor>& forced, bool validate);

// ids int32 [T, k]; 1 <= num_experts <= kMaxExperts. validate: ids in [0, num_experts).
void check_moe_dispatch(const at::Tensor& ids, int64_t num_experts, bool validate);

// expert_out float [T * k, H] (unit stride along H); pair_rows int32 [T * k];
// weights fp32 contiguous [T, k]; all on one device.
void check_moe_combine(const at::Tensor& expert_out, const at::Tensor& pair_rows,
                       const at::Tensor& weights);

// x float [M, K]; weight [E, N, K] in x's dtype; offsets int32/int64 [E + 1]; all on one
// device. validate: offsets[0] == 0, non-decreasing, offsets[E] == M (one host copy).
void check_grouped_gemm(const at::Tensor& x, const at::Tensor& weight,
                        const at::Tensor& offsets, bool validate);

}  // namespace tokenspeed
