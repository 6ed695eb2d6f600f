// Host launchers of the fused dilated-attention kernels (see FusedDilatedParams in params.h for the semantics).
#pragma once

#include <cstdint>

#include "attention/kernels/params.h"

namespace longnet::attention::kernels {

// Head dims the fused kernels are compiled for.
bool fused_dilated_supports_head_dim(int64_t head_dim);

// Whether the forward runs the Hopper kernel (TMA loads, wgmma) for this head dim on `device`: compute capability
// 9.x, D = 64, and a build with the sm_90a target. Elsewhere it runs the mma.sync kernel.
bool fused_dilated_fwd_on_hopper(int64_t head_dim, int device);

// One branch's forward, merged in place into params.out / params.lse.
void launch_fused_dilated_fwd(const FusedDilatedParams& params);

// Per-row statistics the backward needs, for every (b, h, token): delta = Σ_d dout·out, and lse_log2 = lse·log2(e)
// (+inf where lse = -inf, which makes that row's probabilities 0). Uses q's geometry, out, dout, lse of params.
void launch_fused_dilated_bwd_prepare(const FusedDilatedParams& params, float* delta, float* lse_log2);

// One branch's backward: adds its terms to params.dq_acc, dk_acc and dv_acc.
void launch_fused_dilated_bwd(const FusedDilatedParams& params);

}  // namespace longnet::attention::kernels
