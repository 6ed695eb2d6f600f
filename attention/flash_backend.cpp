// The `flash` backend: gather (zero-copy strided views) → attend (torch's fused attention, one call per branch and
// head offset, or per block of heads on consecutive offsets, and chunk) → combine_by_lse (our kernel, in place). The backward calls each call's fused backward with the
// merged output and merged LSE, which makes it exact: P = exp(s - lse) is then the softmax over the whole key
// multiset, and dO·O is the full row's Delta (FACTS.md: 2× faster than autograd through the composition, which is
// ≈1.2 % wrong because it treats each branch's LSE as a constant).
#include "attention/autograd_gcc_warnings.h"  // first: its pragmas cover every later include
#include "attention/flash_backend.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "attention/cuda_backend.h"
#include "core/device_copy.h"
#include "core/error.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/kernels/grad_gather.h"
#include "attention/kernels/lse_combine.h"
#endif

namespace longnet::attention {
namespace {

constexpr int64_t kMaxHeadDim = 256;     // flash's limit; both engines need D % 8 == 0
constexpr int64_t kMaxCudnnHeadDim = 128;  // cuDNN fused SDPA forward+backward on sm_80/sm_90

#ifdef LONGNET_WITH_CUDA

// Every fused call's views span at most this many elements. torch's flash backward fails beyond 2^31 elements
// (FACTS.md: 4M tokens, w = 2048, r = 1); half of that leaves room for the engines' own padding.
constexpr int64_t kMaxSpanPerCall = int64_t{1} << 30;

// The calls' gradients that the backward holds at once (those of a chunk of heads, until they are summed) stay below
// this many bytes: at 4M tokens × 12 heads × 64 a mix of branches would otherwise hold tens of GB of them next to
// q, k, v, the output and their gradients, past an 80 GB card.
constexpr int64_t kBackwardGradientBytes = int64_t{4} << 30;

// Which fused kernel attends. cuDNN attention is 1.45× faster than flash on these strided views at 1M tokens
// (FACTS.md), so it runs whenever it can: D ≤ 128. Larger heads go to flash. A key padding mask is an additive bias,
// which only cuDNN takes, so masks need D ≤ 128 (flash_backend_supports says so). The choice is made here, once per
// input shape; an error from the chosen engine propagates (there is no retry on the other one).
// LONGNET_FLASH_ENGINE=cudnn|flash forces one engine (benchmarks and engine comparisons); any other value is an error.
// One exception, per call (engine_for): cuDNN's backward rejects one-row attention ("s_q = s_kv = 1 is not
// supported", seen with torch 2.11 on an H200), so calls with one row per segment (short ragged tails, w/r = 1) run on
// flash in both directions; with a key padding mask their single key is then removed by hand (see attend_call).
enum class Engine { cudnn, flash };

Engine choose_engine(int64_t head_dim) {
  if (const char* forced = std::getenv("LONGNET_FLASH_ENGINE"); forced != nullptr && *forced != '\0') {
    const std::string name(forced);
    if (name == "cudnn") return Engine::cudnn;
    if (name == "flash") return Engine::flash;
    throw ConfigError("LONGNET_FLASH_ENGINE must be cudnn or flash, got '" + name + "'");
  }
  return head_dim <= kMaxCudnnHeadDim ? Engine::cudnn : Engine::flash;
}

struct Geometry {
  int64_t B, N, H, Hkv, D;
};

// One fused-attention call: batches [b0, b0 + nb), segments [s0, s0 + ns) of `seg_len` tokens starting at
// `first_token` (+ s·seg_len); query heads head0 + j·head_step (j < heads), head j on rows o + j·offset_step,
// o + j·offset_step + r, ... of each segment, `rows` of them. Two layouts, both zero-copy strided views:
//  - by offset (head_step = r, offset_step = 0): the heads ≡ o (mod r), all on the same rows; min(r, H) calls;
//  - by block (head_step = 1, offset_step = 1): consecutive heads k·r, k·r + 1, ... on offsets 0, 1, ... (head j of a
//    branch uses offset j mod r), so one call takes up to r offsets at once; ⌈H / r⌉ calls. Fewer and larger calls
//    for r > 2 (r ≥ H: one call per branch instead of H one-head calls); needs one kv head per query head.
struct Call {
  int64_t b0, nb;
  int64_t first_token;  // token of row 0 of segment 0 of this call
  int64_t seg_len;      // w: tokens between consecutive segments of the call
  int64_t ns;
  int64_t r, o;
  int64_t rows;   // L = rows per segment
  int64_t head0;  // first query head
  int64_t heads;  // Hs = query heads per call
  int64_t head_step = 0, offset_step = 0;
  int64_t batch() const { return nb * ns; }
  // Element stride between consecutive heads of the call in a (B, N, X, D) tensor (token = X·D elements).
  int64_t head_stride(int64_t D, int64_t token) const { return head_step * D + offset_step * token; }
};

// The query heads of [lo, hi) that are ≡ o (mod r): the first one and their count (0 when there is none).
std::pair<int64_t, int64_t> heads_with_offset(int64_t lo, int64_t hi, int64_t r, int64_t o) {
  const int64_t first = lo + ((o - lo) % r + r) % r;
  return {first, first < hi ? (hi - 1 - first) / r + 1 : 0};
}

// A set of query heads attending over the same number of rows per segment: the Call fields other than the batch and
// segment ranges.
struct HeadGroup {
  int64_t o, rows, head0, heads, head_step, offset_step;
};

// The head groups of a branch's heads [lo, hi) over segments of `len` tokens at dilation r, in the layout with fewer
// calls (see Call). Row counts per offset, ⌈(len − o) / r⌉, take at most two values, so a block splits where they
// change. Blocks are used only where each call has two rows or more (one-row calls take another engine).
std::vector<HeadGroup> head_groups(int64_t len, int64_t r, int64_t lo, int64_t hi, bool blocks_allowed) {
  auto rows_at = [&](int64_t o) { return (len - o + r - 1) / r; };
  std::vector<HeadGroup> by_offset, by_block;
  for (int64_t o = 0; o < std::min(r, len); ++o) {
    const auto [head0, heads] = heads_with_offset(lo, hi, r, o);
    if (heads > 0) by_offset.push_back({o, rows_at(o), head0, heads, r, 0});
  }
  bool blocks_ok = blocks_allowed && r > 1;
  for (int64_t h = lo; blocks_ok && h < hi;) {
    const int64_t o = h % r;
    if (o >= len) {  // offsets past the segment have no rows
      h += r - o;
      continue;
    }
    int64_t end = std::min(hi, h - o + std::min(r, len));  // the block's heads with rows
    while (end > h + 1 && rows_at(end - 1 - (h - o)) != rows_at(o)) --end;
    if (rows_at(o) < 2) blocks_ok = false;
    by_block.push_back({o, rows_at(o), h, end - h, 1, 1});
    h = end;
  }
  return blocks_ok && by_block.size() < by_offset.size() ? by_block : by_offset;
}

// Splits every branch into calls. Segments of one batch merge into the call's batch dimension for free; batches
// merge too when the segments tile the whole sequence (the view's batch stride is then ns·w tokens), or for the
// ragged last segment (one per batch). Calls are cut so that no view spans more than kMaxSpanPerCall elements.
std::vector<Call> plan_calls(const Geometry& g, const DilatedAttentionConfig& config) {
  std::vector<Call> calls;
  const int64_t token = g.H * g.D;  // elements per token of q (the largest of q, k, v)
  const int64_t batch_span = g.N * token;
  const bool blocks_allowed = g.Hkv == g.H;
  for (size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const int64_t w = std::min(config.segment_lengths[i], g.N);  // w > N is clamped to N
    const int64_t r = config.dilation_rates[i];
    const int64_t full = g.N / w, tail = g.N % w;
    const auto [lo, hi] = config.branch_heads(i, g.H);
    auto call = [&](const HeadGroup& h, int64_t b0, int64_t nb, int64_t first_token, int64_t seg_len, int64_t ns) {
      return Call{b0, nb, first_token, seg_len, ns, r, h.o, h.rows, h.head0, h.heads, h.head_step, h.offset_step};
    };
    if (full > 0) {
      for (const HeadGroup& h : head_groups(w, r, lo, hi, blocks_allowed)) {
        const int64_t seg_span = w * token;
        if (full * w == g.N && batch_span <= kMaxSpanPerCall) {
          const int64_t nb = std::max<int64_t>(1, kMaxSpanPerCall / batch_span);
          for (int64_t b0 = 0; b0 < g.B; b0 += nb) calls.push_back(call(h, b0, std::min(nb, g.B - b0), 0, w, full));
        } else {
          const int64_t ns = std::max<int64_t>(1, kMaxSpanPerCall / seg_span);
          for (int64_t b = 0; b < g.B; ++b) {
            for (int64_t s0 = 0; s0 < full; s0 += ns) calls.push_back(call(h, b, 1, s0 * w, w, std::min(ns, full - s0)));
          }
        }
      }
    }
    if (tail > 0) {
      for (const HeadGroup& h : head_groups(tail, r, lo, hi, blocks_allowed)) {
        const int64_t spare = kMaxSpanPerCall - tail * token;
        const int64_t nb = std::max<int64_t>(1, spare > 0 ? spare / batch_span + 1 : 1);
        for (int64_t b0 = 0; b0 < g.B; b0 += nb) calls.push_back(call(h, b0, std::min(nb, g.B - b0), full * w, tail, 1));
      }
    }
  }
  return calls;
}

// The call restricted to the query heads in [lo, hi); nullopt when it has none there.
std::optional<Call> restrict_heads(const Call& c, int64_t lo, int64_t hi) {
  Call sub = c;
  if (c.offset_step == 0) {
    const auto [head0, heads] = heads_with_offset(std::max(lo, c.head0), std::min(hi, c.head0 + c.heads * c.r), c.r,
                                                  c.o);
    sub.head0 = head0;
    sub.heads = heads;
  } else {  // a block: consecutive heads on consecutive offsets
    const int64_t first = std::max(lo, c.head0), last = std::min(hi, c.head0 + c.heads);
    sub.head0 = first;
    sub.heads = last - first;
    sub.o = c.o + (first - c.head0);
  }
  if (sub.heads <= 0) return std::nullopt;
  return sub;
}

// gather: x (B, N, X, D) contiguous → (nb·ns, heads, L, D), a zero-copy view of the call's rows and of `heads`
// heads from head0, `head_stride` elements apart. `view` (not reshape) proves that no copy happens.
at::Tensor sparsify(const at::Tensor& x, const Call& c, int64_t head0, int64_t head_stride, int64_t heads) {
  const int64_t N = x.size(1), D = x.size(3), token = x.size(2) * D;
  const int64_t offset = x.storage_offset() + c.b0 * N * token + (c.first_token + c.o) * token + head0 * D;
  return x.as_strided({c.nb, c.ns, heads, c.rows, D}, {N * token, c.seg_len * token, head_stride, c.r * token, 1},
                      offset)
      .view({c.batch(), heads, c.rows, D});
}

// The call's query heads in an (B, N, H, D) tensor.
at::Tensor sparsify_heads(const at::Tensor& x, const Call& c) {
  return sparsify(x, c, c.head0, c.head_stride(x.size(3), x.size(2) * x.size(3)), c.heads);
}

// k or v for the call: zero-copy when every query head has its own kv head; with grouped-query heads the query heads
// head0, head0 + r, ... read kv heads (head0 + j·r) / G, which in general are not evenly spaced, so they are gathered
// (a copy of the call's rows only).
at::Tensor sparsify_kv(const at::Tensor& kv, const Call& c, int64_t H) {
  const int64_t Hkv = kv.size(2);
  if (Hkv == H) return sparsify_heads(kv, c);
  const int64_t group = H / Hkv;
  std::vector<int64_t> index(c.heads);
  for (int64_t j = 0; j < c.heads; ++j) index[j] = (c.head0 + j * c.head_step) / group;
  const auto idx = to_device_async(torch::tensor(index, torch::dtype(torch::kLong)), kv.device());
  TORCH_CHECK(c.offset_step == 0, "flash backend: grouped kv heads need calls by offset");
  return sparsify(kv, c, 0, kv.size(3), Hkv).index_select(1, idx);
}

// The call's rows of lse (B, H, N) float32 as (nb, ns, heads, L), and its strides for the combine kernel.
at::Tensor sparsify_lse(const at::Tensor& lse, const Call& c) {
  const int64_t H = lse.size(1), N = lse.size(2);
  const int64_t offset = lse.storage_offset() + c.b0 * H * N + c.head0 * N + c.first_token + c.o;
  return lse.as_strided({c.nb, c.ns, c.heads, c.rows}, {H * N, c.seg_len, c.head_step * N + c.offset_step, c.r},
                        offset);
}

// The call's rows of key_padding_mask (B, N) bool as (nb·ns, 1, 1, L), or (nb·ns, heads, 1, L) when its heads sit
// on different rows (by block): true where the key is removed.
at::Tensor removed_keys(const at::Tensor& mask, const Call& c) {
  const int64_t N = mask.size(1);
  const int64_t offset = mask.storage_offset() + c.b0 * N + c.first_token + c.o;
  const int64_t heads = c.offset_step == 0 ? 1 : c.heads;
  return mask.as_strided({c.nb, c.ns, heads, c.rows}, {N, c.seg_len, c.offset_step, c.r}, offset)
      .view({c.batch(), heads, 1, c.rows});
}

// key_padding_mask (B, N) bool → additive bias (nb·ns, heads, L, L) in q's dtype: -inf on removed keys. Expanded
// (stride 0) over query rows, and over heads when they share their rows.
std::optional<at::Tensor> key_bias(const std::optional<at::Tensor>& mask, const Call& c, at::ScalarType dtype) {
  if (!mask) return std::nullopt;
  const auto removed = removed_keys(*mask, c);
  return at::zeros(removed.sizes(), mask->options().dtype(dtype))
      .masked_fill_(removed, -std::numeric_limits<double>::infinity())
      .expand({c.batch(), c.heads, c.rows, c.rows});
}

Engine engine_for(Engine chosen, const Call& c) { return c.rows < 2 ? Engine::flash : chosen; }

// Masks reach the fused kernel as cuDNN's additive bias. Flash takes none: it runs masked calls only with one row
// per segment, where the single key is the query's own row, so a removed key means the row contributes nothing.
void require_mask_support(Engine engine, const std::optional<at::Tensor>& mask, const Call& c) {
  if (mask && engine == Engine::flash && c.rows > 1) {
    throw Error("flash attention backend: key_padding_mask needs the cuDNN engine, and LONGNET_FLASH_ENGINE=flash is "
                "set");
  }
}

struct Attended {
  at::Tensor out;  // (B', Hs, L, D)
  at::Tensor lse;  // (B', Hs, L) float32 (a trailing 1 dim for cuDNN)
};

// attend: one fused call with LSE.
Attended attend(Engine engine, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& bias, bool causal, double scale) {
  if (engine == Engine::cudnn) {
    auto res = at::_scaled_dot_product_cudnn_attention(q, k, v, bias, /*compute_log_sumexp=*/true, /*dropout_p=*/0.0,
                                                       causal, /*return_debug_mask=*/false, scale);
    return {std::get<0>(res), std::get<1>(res)};
  }
  auto res = at::_scaled_dot_product_flash_attention(q, k, v, /*dropout_p=*/0.0, causal, /*return_debug_mask=*/false,
                                                     scale);
  return {std::get<0>(res), std::get<1>(res)};
}

// The kernels see a call as a 4-d grid of rows (nb, ns, heads, L) with one stride per dimension; these give the
// grid and its strides in the tensors the kernels read and write.
void set_row_grid(int64_t (&rows)[4], const Call& c) {
  rows[0] = c.nb;
  rows[1] = c.ns;
  rows[2] = c.heads;
  rows[3] = c.rows;
}

// In a contiguous (B, N, X, D) tensor, token = X·D elements (what sparsify views).
void set_tensor_strides(int64_t (&strides)[4], const Call& c, int64_t N, int64_t D, int64_t token) {
  const int64_t s[4] = {N * token, c.seg_len * token, c.head_stride(D, token), c.r * token};
  for (int d = 0; d < 4; ++d) strides[d] = s[d];
}

// In a fused call's output, gradient or LSE (nb·ns, heads, L, ...): its batch dimension split into (nb, ns).
void set_call_output_strides(int64_t (&strides)[4], const Call& c, const at::Tensor& t) {
  const int64_t s[4] = {c.ns * t.stride(0), t.stride(0), t.stride(1), t.stride(2)};
  for (int d = 0; d < 4; ++d) strides[d] = s[d];
}

// combine_by_lse: merges the call's (out_i, lse_i) into the running out (B, N, H, D) and lse (B, H, N) in place.
void combine_by_lse(at::Tensor& out, at::Tensor& lse, const Attended& branch, const Call& c) {
  TORCH_CHECK(branch.out.stride(3) == 1, "combine_by_lse: the fused kernel returned an output with inner stride ",
              branch.out.stride(3));
  const int64_t N = out.size(1), H = out.size(2), D = out.size(3), token = H * D;
  kernels::LseCombineParams p;
  p.out = static_cast<char*>(out.data_ptr()) +
          (c.b0 * N * token + (c.first_token + c.o) * token + c.head0 * D) * static_cast<int64_t>(out.element_size());
  p.out_i = branch.out.data_ptr();
  const at::Tensor lse_view = sparsify_lse(lse, c);
  p.lse = lse_view.data_ptr<float>();
  p.lse_i = branch.lse.data_ptr<float>();
  set_row_grid(p.rows, c);
  p.head_dim = D;
  set_tensor_strides(p.out_strides, c, N, D, token);
  set_call_output_strides(p.out_i_strides, c, branch.out);
  set_call_output_strides(p.lse_i_strides, c, branch.lse);
  for (int d = 0; d < 4; ++d) p.lse_strides[d] = lse_view.stride(d);
  p.dtype = element_type(out.scalar_type());
  p.stream = at::cuda::getCurrentCUDAStream(out.get_device()).stream();
  kernels::launch_lse_combine_fwd(p);
}

// gather_grads: dq, dk and dv of the chunk of query heads [h0, h0 + hc) (and its kv heads) as the sum of the calls'
// gradients (dq, dk, dv as (B', Hs, L, D) each, per query head), in one launch per output (see GradGatherParams).
void gather_grads(const std::array<at::Tensor*, 3>& out, const std::vector<Call>& calls,
                  const std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor>>& grads, int64_t h0, int64_t hc,
                  int64_t group) {
  const at::Tensor& dq = *out[0];
  const int64_t N = dq.size(1), D = dq.size(3);
  const auto dtype = element_type(dq.scalar_type());
  auto table = at::empty({static_cast<int64_t>(calls.size() * sizeof(kernels::GradCall))},
                         at::TensorOptions().dtype(at::kByte));
  auto* descriptors = reinterpret_cast<kernels::GradCall*>(table.data_ptr());
  bool vectorizable = true;
  const auto narrow32 = [](int64_t x) { return static_cast<int32_t>(x); };  // checked by the caller
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    kernels::GradCall d;
    const at::Tensor* g[3] = {&std::get<0>(grads[i]), &std::get<1>(grads[i]), &std::get<2>(grads[i])};
    for (int t = 0; t < 3; ++t) {
      TORCH_CHECK(g[t]->stride(3) == 1, "flash backward: the fused kernel returned a gradient with inner stride ",
                  g[t]->stride(3));
      d.grad[t] = g[t]->data_ptr();
      set_call_output_strides(d.grad_strides[t], c, *g[t]);
    }
    d.b0 = narrow32(c.b0), d.nb = narrow32(c.nb), d.first_token = narrow32(c.first_token);
    d.seg_len = narrow32(c.seg_len), d.ns = narrow32(c.ns), d.r = narrow32(c.r), d.o = narrow32(c.o);
    d.rows = narrow32(c.rows), d.head0 = narrow32(c.head0), d.heads = narrow32(c.heads);
    d.head_step = narrow32(std::max<int64_t>(c.head_step, 1)), d.offset_step = narrow32(c.offset_step);
    vectorizable = vectorizable && kernels::grad_call_vectorizable(d, dtype);
    descriptors[i] = d;
  }
  const auto device_table = to_device_async(table, dq.device());
  kernels::GradGatherParams p;
  p.calls = reinterpret_cast<const kernels::GradCall*>(device_table.data_ptr());
  p.num_calls = static_cast<int32_t>(calls.size());
  const int64_t first[3] = {h0, h0 / group, h0 / group};
  for (int t = 0; t < 3; ++t) {
    const at::Tensor& o = *out[t];
    p.out[t] = static_cast<char*>(o.data_ptr()) + first[t] * D * static_cast<int64_t>(o.element_size());
    for (int d = 0; d < 3; ++d) p.out_strides[t][d] = o.stride(d);
  }
  p.batch = dq.size(0);
  p.tokens = N;
  p.heads = static_cast<int32_t>(hc);
  p.group = static_cast<int32_t>(group);
  p.first_head = static_cast<int32_t>(h0);
  p.head_dim = D;
  p.dtype = dtype;
  p.stream = at::cuda::getCurrentCUDAStream(dq.get_device()).stream();
  kernels::launch_grad_gather(p, vectorizable);
}

struct Problem {
  Geometry g;
  std::vector<Call> calls;
  Engine engine;
  bool causal;
  double scale;
};

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const DilatedAttentionConfig& config, double scale) {
  const Geometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  return {g, plan_calls(g, config), choose_engine(g.D), config.causal, scale};
}

// Forward: out (B, N, H, D) in q's dtype, lse (B, H, N) float32. Branch rows are merged into `out` as they come, so
// the only temporaries are one call's output and LSE; the running output is rounded to q's dtype between branches
// (the kernel's arithmetic is float32), which keeps an 8M-token forward within an 80 GB card.
std::pair<at::Tensor, at::Tensor> forward_impl(const Problem& pb, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& v, const std::optional<at::Tensor>& mask) {
  auto out = at::zeros_like(q);
  auto lse = at::full({pb.g.B, pb.g.H, pb.g.N}, -std::numeric_limits<double>::infinity(),
                      q.options().dtype(at::kFloat));
  for (const Call& c : pb.calls) {
    const Engine engine = engine_for(pb.engine, c);
    require_mask_support(engine, mask, c);
    const auto bias = engine == Engine::cudnn ? key_bias(mask, c, q.scalar_type()) : std::nullopt;
    Attended branch = attend(engine, sparsify_heads(q, c), sparsify_kv(k, c, pb.g.H), sparsify_kv(v, c, pb.g.H), bias,
                             pb.causal, pb.scale);
    if (mask && engine == Engine::flash) {  // one row: a removed key leaves the row without keys
      branch.lse = branch.lse.masked_fill(removed_keys(*mask, c).view({c.batch(), 1, 1}),
                                          -std::numeric_limits<double>::infinity());
    }
    combine_by_lse(out, lse, branch, c);
  }
  return {out, lse};
}

// Exact gradients of the branches of `pb` given the merged output and LSE of the whole mix they belong to (see the
// file comment): one fused backward per call, their gradients summed in float32 a chunk of heads at a time.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const Problem& pb, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const at::Tensor& dout,
                                                             const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(q.device());
  const Geometry& g = pb.g;
  const int64_t group = g.H / g.Hkv;
  if (g.N > std::numeric_limits<int32_t>::max() || g.B > std::numeric_limits<int32_t>::max()) {
    throw Error("flash attention backend: the backward takes at most 2^31 - 1 tokens and batch rows");
  }

  // Each element of dq, dk and dv is the float32 sum of one term per call that attended its row (and, for dk and dv,
  // per query head of its group), rounded once. The calls' gradients stay alive until they are summed, a chunk of
  // query heads at a time, so that they stay within kBackwardGradientBytes whatever N is. Chunks hold whole
  // grouped-query groups. Every element sees the same calls in the same order with or without chunking, so the
  // result does not depend on the chunk size.
  double rows_per_token = 0;  // per head: each branch's calls hold about 1/r of the tokens' rows
  for (size_t i = 0; i < pb.calls.size(); ++i) {
    const Call& c = pb.calls[i];
    rows_per_token += static_cast<double>(c.nb * c.ns * c.rows * c.heads) / static_cast<double>(g.B * g.N * g.H);
  }
  const auto per_head_bytes = static_cast<int64_t>(std::ceil(3.0 * g.B * g.N * g.D * q.element_size() *
                                                             std::max(rows_per_token, 1.0)));
  const int64_t chunk_groups = std::clamp<int64_t>(kBackwardGradientBytes / (per_head_bytes * group), 1, g.Hkv);
  const int64_t chunk = chunk_groups * group;
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // A row without keys has lse = -inf and out = 0: with lse = +inf instead, exp(s - lse) = 0 and its gradient
  // vanishes, where -inf would give exp(-inf + inf) = NaN.
  const auto lse_bwd = lse.masked_fill(lse == -std::numeric_limits<double>::infinity(),
                                       std::numeric_limits<double>::infinity());
  const auto no_rng = at::zeros({}, q.options().dtype(at::kLong));
  for (int64_t h0 = 0; h0 < g.H; h0 += chunk) {
    const int64_t hc = std::min(chunk, g.H - h0);
    std::vector<Call> calls;
    for (const Call& full_call : pb.calls) {
      if (auto sub = restrict_heads(full_call, h0, h0 + hc)) calls.push_back(*sub);
    }
    std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor>> grads;
    grads.reserve(calls.size());
    for (const Call& c : calls) {
      const auto qc = sparsify_heads(q, c), kc = sparsify_kv(k, c, g.H), vc = sparsify_kv(v, c, g.H);
      const auto oc = sparsify_heads(out, c), doc = sparsify_heads(dout, c);
      // The merged LSE, gathered into the dense layout the fused backward reads.
      const auto lc = sparsify_lse(lse_bwd, c).reshape({c.batch(), c.heads, c.rows}).contiguous();
      std::tuple<at::Tensor, at::Tensor, at::Tensor> grad;
      const Engine engine = engine_for(pb.engine, c);
      require_mask_support(engine, mask, c);
      if (engine == Engine::cudnn) {
        const auto bias = key_bias(mask, c, q.scalar_type());
        grad = at::_scaled_dot_product_cudnn_attention_backward(
            doc, qc, kc, vc, oc, lc.unsqueeze(-1), no_rng, no_rng, bias ? *bias : at::Tensor(), at::Tensor(),
            at::Tensor(), c.rows, c.rows, /*dropout_p=*/0.0, pb.causal, pb.scale);
      } else {
        grad = at::_scaled_dot_product_flash_attention_backward(doc, qc, kc, vc, oc, lc, at::Tensor(), at::Tensor(),
                                                                c.rows, c.rows, /*dropout_p=*/0.0, pb.causal,
                                                                no_rng, no_rng, pb.scale);
        if (mask) {  // one row: a removed key took no part in the forward, so its row gets no gradient
          const auto removed = removed_keys(*mask, c);
          for (at::Tensor* t : {&std::get<0>(grad), &std::get<1>(grad), &std::get<2>(grad)}) {
            *t = t->masked_fill(removed, 0.0);
          }
        }
      }
      grads.push_back(std::move(grad));
    }
    gather_grads({&dq, &dk, &dv}, calls, grads, h0, hc, group);
  }
  return {dq, dk, dv};
}

// The flash backend for DilatedFunction (cuda_backend.h).
struct FlashImpl {
  static std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const std::optional<at::Tensor>& mask,
                                                   const DilatedAttentionConfig& config, double scale) {
    return forward_impl(make_problem(q, k, config, scale), q, k, v, mask);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
      const at::Tensor& dout, const std::optional<at::Tensor>& mask, const DilatedAttentionConfig& config,
      double scale) {
    return backward_impl(make_problem(q, k, config, scale), q, k, v, out, lse, dout, mask);
  }
};

#endif  // LONGNET_WITH_CUDA

}  // namespace

bool flash_backend_supports(const at::Tensor& q, const AttentionOptions& options, std::string* why) {
  auto fail = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return false;
  };
  if (!cuda_backend_accepts("flash", q, why)) return false;
  const int64_t D = q.size(3);
  if (D % 8 != 0 || D < 8 || D > kMaxHeadDim) {
    return fail("head dim D = " + std::to_string(D) + "; the flash backend needs a multiple of 8 in [8, " +
                std::to_string(kMaxHeadDim) + "]");
  }
  if (options.relative_bias) {
    return fail("the flash backend has no relative position bias (the reference backend has)");
  }
  if (options.key_padding_mask && D > kMaxCudnnHeadDim) {
    return fail("key_padding_mask runs through cuDNN attention's bias, which needs D <= " +
                std::to_string(kMaxCudnnHeadDim) + ", got D = " + std::to_string(D));
  }
  return true;
}

AttentionResult flash_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const DilatedAttentionConfig& config, const AttentionOptions& options) {
  config.validate();
  std::string why;
  if (!flash_backend_supports(q, options, &why)) throw Error("flash attention backend: " + why);
#ifndef LONGNET_WITH_CUDA
  (void)k;
  (void)v;
  throw Error("flash attention backend: " + why);
#else
  return run_dilated_function<FlashImpl>(q, k, v, check_cuda_backend_inputs("flash", q, k, v, options), config);
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_dilated_attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& dout, const DilatedAttentionConfig& config, const AttentionOptions& options) {
  config.validate();
  std::string why;
  if (!flash_backend_supports(q, options, &why)) throw Error("flash attention backend: " + why);
#ifndef LONGNET_WITH_CUDA
  (void)k;
  (void)v;
  (void)out;
  (void)lse;
  (void)dout;
  throw Error("flash attention backend: " + why);
#else
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2);
  auto expect = [](bool ok, const std::string& message) {
    if (!ok) throw Error("flash attention backward: " + message);
  };
  expect(k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == B && k.size(1) == N && H % k.size(2) == 0,
         "k and v must be (B, N, Hkv, D) for q " + sizes_of(q));
  expect(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "out and dout must have q's shape " + sizes_of(q));
  expect(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == N &&
             lse.scalar_type() == at::kFloat,
         "lse must be (B, H, N) float32");
  std::optional<at::Tensor> mask;
  if (options.key_padding_mask) mask = options.key_padding_mask->contiguous();
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  const Problem pb = make_problem(q, k, config, scale);
  const auto dtype = q.scalar_type();
  return backward_impl(pb, q.contiguous(), k.contiguous(), v.contiguous(), out.to(dtype).contiguous(),
                       lse.contiguous(), dout.to(dtype).contiguous(), mask);
#endif
}

}  // namespace longnet::attention
