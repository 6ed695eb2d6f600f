#include "distributed/sequence_parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "attention/flash_backend.h"
#include "attention/reference.h"
#include "core/error.h"

namespace longnet::distributed {

using attention::AttentionOptions;
using attention::AttentionResult;
using attention::DilatedAttentionConfig;

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// All-gather whose backward sums the gradient of every gathered copy back into its owner's rows (reduce-scatter).
// When the tensor at `reuse_address` is defined, the forward returns a copy of it instead of communicating: the result
// of the same all-gather kept from an earlier forward (the backward's recompute). The group and the counters are held
// by pointer: they must outlive the backward (the caller's training loop).
class GatherRows : public torch::autograd::Function<GatherRows> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& local, int64_t reuse_address,
                            int64_t group_address, int64_t stats_address) {
    ctx->saved_data["group"] = group_address;
    ctx->saved_data["stats"] = stats_address;
    const auto& group = *reinterpret_cast<const ProcessGroup*>(group_address);
    auto* stats = reinterpret_cast<CommStats*>(stats_address);
    std::vector<int64_t> shape = local.sizes().vec();
    shape.insert(shape.begin(), group.size());
    const at::Tensor& reuse = *reinterpret_cast<const at::Tensor*>(reuse_address);
    if (reuse.defined()) return reuse.clone().view(shape);
    const auto in = local.contiguous().view({-1});
    auto out = at::empty({group.size() * in.numel()}, in.options());
    group.all_gather(out, in, stats);
    return out.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto& group = *reinterpret_cast<const ProcessGroup*>(ctx->saved_data["group"].toInt());
    auto* stats = reinterpret_cast<CommStats*>(ctx->saved_data["stats"].toInt());
    const auto grad = grads[0].contiguous().view({-1});
    auto out = at::empty({grad.numel() / group.size()}, grad.options());
    group.reduce_scatter(out, grad, stats);
    return {out.view(grads[0].sizes().slice(1)), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (B, N, Hkv, D) -> (B, N, H, D): query head h reads kv head h / (H / Hkv); autograd sums each group's gradient.
at::Tensor expand_kv_heads(const at::Tensor& x, int64_t heads) {
  const int64_t kv_heads = x.size(2);
  if (kv_heads == heads) return x;
  return x.unsqueeze(3)
      .expand({x.size(0), x.size(1), kv_heads, heads / kv_heads, x.size(3)})
      .reshape({x.size(0), x.size(1), heads, x.size(3)});
}

// First local row (of a part starting at `start`) whose global position is ≡ o (mod r).
int64_t first_row(int64_t start, int64_t o, int64_t r) { return ((o - start) % r + r) % r; }

// Rows f, f + r, ... below n.
int64_t row_count(int64_t f, int64_t n, int64_t r) { return f < n ? (n - f + r - 1) / r : 0; }

// Rows f, f + r, ... (count of them) along dim 1.
at::Tensor strided_rows(const at::Tensor& x, int64_t f, int64_t count, int64_t r) {
  return x.narrow(1, f, (count - 1) * r + 1).slice(1, 0, std::nullopt, r);
}

struct SpanningBranch {
  int64_t segment_length = 0;  // clamped to N
  int64_t rate = 1;
};

// One spanning branch on this rank's queries: out (B, n, H, D) and lse (B, H, n) in dtype `acc`; rows the branch
// does not select keep out = 0, lse = -inf. q, k, v: (B, n, H, D) (kv heads already expanded); keep: (B, n) bool
// (true = the key takes part) or undefined. `gathered`: this branch's all-gathered rows from an earlier forward to
// reuse, or undefined to communicate; receives the all-gathered rows (without autograd history).
AttentionResult spanning_branch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep,
                                const SpanningBranch& branch, bool causal, double scale, at::ScalarType acc,
                                const ProcessGroup& group, int64_t global_n, CommStats* stats, at::Tensor& gathered) {
  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t P = group.size(), w = branch.segment_length, r = branch.rate;
  const SequencePart part = sequence_part(global_n, P, group.rank());
  const int64_t rows_max = (sequence_part(global_n, P, 0).length + r - 1) / r;  // part 0 is the longest
  const int64_t offsets = std::min(r, H);                                      // offsets >= H have no heads

  // Send buffer: for head h, row j holds the key/value at local row first_row(o) + j·r, o = h mod r; the last channel
  // is 1 for a real, unpadded key and 0 otherwise (rows past the part's count stay 0).
  auto send = at::zeros({B, rows_max, H, 2 * D + 1}, k.options());
  const auto keep_value = keep.defined() ? keep.to(k.scalar_type()) : at::ones({B, n}, k.options());
  for (int64_t o = 0; o < offsets; ++o) {
    const int64_t f = first_row(part.start, o, r), count = row_count(f, n, r);
    if (count == 0) continue;
    auto rows = send.narrow(1, 0, count).slice(2, o, H, r);  // (B, count, H_o, 2D+1)
    rows.narrow(3, 0, D).copy_(strided_rows(k, f, count, r).slice(2, o, H, r));
    rows.narrow(3, D, D).copy_(strided_rows(v, f, count, r).slice(2, o, H, r));
    rows.narrow(3, 2 * D, 1).copy_(strided_rows(keep_value, f, count, r).view({B, count, 1, 1}).expand_as(
        rows.narrow(3, 2 * D, 1)));
  }
  const auto all_rows =
      GatherRows::apply(send, reinterpret_cast<int64_t>(&gathered), reinterpret_cast<int64_t>(&group),
                        reinterpret_cast<int64_t>(stats));
  gathered = all_rows.detach();

  // Only the ranks whose parts meet the segments of this part's rows hold keys these queries can read.
  const int64_t seg_lo = (part.start / w) * w;
  const int64_t seg_hi = std::min(global_n, ((part.start + n - 1) / w + 1) * w);
  int64_t rank_lo = P, rank_hi = -1;
  for (int64_t p = 0; p < P; ++p) {
    const SequencePart other = sequence_part(global_n, P, p);
    if (other.start < seg_hi && other.start + other.length > seg_lo) {
      rank_lo = std::min(rank_lo, p);
      rank_hi = std::max(rank_hi, p);
    }
  }
  const int64_t R = rank_hi - rank_lo + 1;
  const auto window = all_rows.narrow(0, rank_lo, R);  // (R, B, rows_max, H, 2D+1)

  auto out_full = at::zeros({B, n, H, D}, q.options().dtype(acc));
  auto lse_full = at::full({B, H, n}, kNegInf, q.options().dtype(acc));
  for (int64_t o = 0; o < offsets; ++o) {
    const int64_t f = first_row(part.start, o, r), count = row_count(f, n, r);
    if (count == 0) continue;
    const auto q_o = strided_rows(q, f, count, r).slice(2, o, H, r).permute({0, 2, 1, 3});  // (B, H_o, c, D)
    const int64_t H_o = q_o.size(1);
    const auto kv = window.slice(3, o, H, r).permute({1, 3, 0, 2, 4}).reshape({B, H_o, R * rows_max, 2 * D + 1});
    const auto k_o = kv.narrow(3, 0, D), v_o = kv.narrow(3, D, D);
    const auto key_ok = kv.select(3, 2 * D).gt(0.5).unsqueeze(2);  // (B, H_o, 1, R·rows_max)

    // Which gathered rows each query may read: same segment, and not after the query when causal. Positions are
    // arithmetic progressions (row j of rank p sits at start_p + first_row + j·r), built on the device.
    const auto long_options = q.options().dtype(at::kLong);
    std::vector<int64_t> rank_first(static_cast<size_t>(R));
    for (int64_t i = 0; i < R; ++i) {
      const SequencePart other = sequence_part(global_n, P, rank_lo + i);
      rank_first[static_cast<size_t>(i)] = other.start + first_row(other.start, o, r);
    }
    const auto key_pos = (torch::tensor(rank_first, torch::dtype(torch::kLong)).to(q.device()).view({R, 1}) +
                          at::arange(rows_max, long_options).mul(r).view({1, rows_max}))
                             .view({1, R * rows_max});
    const auto query_pos = at::arange(count, long_options).mul(r).add(part.start + f).view({count, 1});
    auto allowed = key_pos.div(w, "floor").eq(query_pos.div(w, "floor"));
    if (causal) allowed = allowed.logical_and(key_pos.le(query_pos));
    allowed = allowed.view({1, 1, count, R * rows_max}).logical_and(key_ok);

    // Masked softmax as in the reference backend: rows without keys get out = 0 and lse = -inf with finite gradients.
    const auto [out, lse] = attention::masked_softmax_attention(q_o, k_o, v_o, allowed, at::Tensor(), scale, acc);

    strided_rows(out_full, f, count, r).slice(2, o, H, r).copy_(out.permute({0, 2, 1, 3}));
    lse_full.slice(1, o, H, r).narrow(2, f, (count - 1) * r + 1).slice(2, 0, std::nullopt, r).copy_(lse);
  }
  return {out_full, lse_full};
}

// What the forward of SequenceParallelFunction needs besides q, k and v (held by the caller for the forward only).
struct Plan {
  DilatedAttentionConfig local;          // the branches that stay inside every part (may be empty)
  std::vector<SpanningBranch> spanning;  // the others (not empty)
  AttentionOptions options;
  const ProcessGroup* group = nullptr;
  CommStats* stats = nullptr;
  int64_t global_n = 0;
  double scale = 1.0;
};

// exp(lse_b - lse) for a part b of a mix with total LSE `lse`: its weight in the merged output (0 where b has no key).
at::Tensor mix_weight(const at::Tensor& lse_b, const at::Tensor& lse) {
  const auto finite = at::isfinite(lse_b);
  return at::where(finite, at::exp(lse_b - at::where(finite, lse, 0.0)), 0.0);
}

// (B, H, n) -> (B, n, H, 1), to scale the rows of an output
at::Tensor rows_of(const at::Tensor& x) { return x.permute({0, 2, 1}).unsqueeze(-1); }

// The local branches and the spanning branches, mixed by their LSEs. The forward runs without autograd; the backward
// differentiates each part with the merged output F and LSE L: a part b with output O_b and LSE L_b enters F with
// weight w_b = exp(L_b - L), so dO_b = w_b·dF and dL_b = w_b·(dF·(O_b - F) + dL). The local branches may run on a
// backend whose LSE carries no gradient (flash): their dL_b is applied as Σ_j P_ij·dL_b,i, i.e.
//   dq_i += scale·dL_b,i·Σ_j P_ij k_j       (attention with the keys as values), and
//   dk_j += Σ_i P_ij·scale·dL_b,i·q_i       (the value gradient of that same attention),
// so only the output gradients of the backend are used. The spanning branches are recomputed with autograd on the
// rows the forward all-gathered (kept); the backward of that all-gather reduce-scatters.
class SequenceParallelFunction : public torch::autograd::Function<SequenceParallelFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, int64_t plan_address) {
    const Plan& plan = *reinterpret_cast<const Plan*>(plan_address);
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    std::vector<at::Tensor> gathered(plan.spanning.size());
    const auto [out, lse] = mix(q, k, v, plan.local, plan.spanning, plan.options, *plan.group, plan.stats,
                                plan.global_n, plan.scale, acc, gathered, /*parts=*/nullptr);
    std::vector<at::Tensor> to_save{q, k, v, out, lse};
    to_save.insert(to_save.end(), gathered.begin(), gathered.end());
    ctx->save_for_backward(to_save);
    // An output nobody differentiates reaches the backward undefined (not as zeros), so that the backward can tell
    // when no gradient flows into the LSE.
    ctx->set_materialize_grads(false);
    std::vector<int64_t> spanning_lengths, spanning_rates;
    for (const SpanningBranch& b : plan.spanning) {
      spanning_lengths.push_back(b.segment_length);
      spanning_rates.push_back(b.rate);
    }
    ctx->saved_data["local_lengths"] = plan.local.segment_lengths;
    ctx->saved_data["local_rates"] = plan.local.dilation_rates;
    ctx->saved_data["backend"] = static_cast<int64_t>(plan.local.backend);
    ctx->saved_data["causal"] = plan.local.causal;
    ctx->saved_data["spanning_lengths"] = spanning_lengths;
    ctx->saved_data["spanning_rates"] = spanning_rates;
    ctx->saved_data["mask"] = plan.options.key_padding_mask ? c10::IValue(*plan.options.key_padding_mask)
                                                            : c10::IValue();
    ctx->saved_data["scale"] = plan.scale;
    ctx->saved_data["global_n"] = plan.global_n;
    ctx->saved_data["group"] = reinterpret_cast<int64_t>(plan.group);
    ctx->saved_data["stats"] = reinterpret_cast<int64_t>(plan.stats);
    return {out.to(q.scalar_type()), lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const auto acc = out.scalar_type();
    const auto d_out = grads[0].defined() ? grads[0].to(acc) : at::zeros_like(out);
    const auto d_lse = grads[1].defined() ? grads[1].to(acc) : at::zeros_like(lse);

    DilatedAttentionConfig local;
    local.segment_lengths = ctx->saved_data["local_lengths"].toIntVector();
    local.dilation_rates = ctx->saved_data["local_rates"].toIntVector();
    local.backend = static_cast<attention::Backend>(ctx->saved_data["backend"].toInt());
    local.causal = ctx->saved_data["causal"].toBool();
    std::vector<SpanningBranch> spanning;
    const auto lengths = ctx->saved_data["spanning_lengths"].toIntVector();
    const auto rates = ctx->saved_data["spanning_rates"].toIntVector();
    for (size_t i = 0; i < lengths.size(); ++i) spanning.push_back({lengths[i], rates[i]});
    AttentionOptions options;
    if (!ctx->saved_data["mask"].isNone()) options.key_padding_mask = ctx->saved_data["mask"].toTensor();
    const double scale = ctx->saved_data["scale"].toDouble();
    options.scale = scale;
    const auto& group = *reinterpret_cast<const ProcessGroup*>(ctx->saved_data["group"].toInt());
    auto* stats = reinterpret_cast<CommStats*>(ctx->saved_data["stats"].toInt());
    const int64_t global_n = ctx->saved_data["global_n"].toInt();

    // dL_b's factor shared by every part: dF·(O_b - F) + dL, per (B, H, n), with w_b applied by the caller.
    auto lse_grad = [&](const at::Tensor& out_b, const at::Tensor& w_b) {
      return w_b * ((d_out * (out_b.to(acc) - out)).sum(-1).permute({0, 2, 1}) + d_lse);
    };
    auto dq = at::zeros(q.sizes(), q.options().dtype(acc));
    auto dk = at::zeros(k.sizes(), k.options().dtype(acc));
    auto dv = at::zeros(v.sizes(), v.options().dtype(acc));
    auto add = [](at::Tensor& sum, const at::Tensor& part) {
      if (part.defined()) sum.add_(part.to(sum.scalar_type()));
    };
    torch::AutoGradMode enable_grad(true);

    // The local branches on the flash backend, when nothing flows into the returned LSE (training losses read the
    // output only): each fused backward run with the merged output and LSE of the whole mix gives these branches'
    // exact share of the gradient directly (attention/flash_backend.h), without recomputing them.
    const bool fast_local = !local.segment_lengths.empty() && !grads[1].defined() &&
                            attention::resolve_backend(q, local, options) == attention::Backend::flash;
    if (fast_local) {
      const auto [lq, lk, lv] = attention::flash_dilated_attention_backward(q, k, v, out, lse, d_out, local, options);
      add(dq, lq);
      add(dk, lk);
      add(dv, lv);
    } else if (!local.segment_lengths.empty()) {
      const auto qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(), vg = v.detach().requires_grad_();
      const auto part = attention::dilated_attention(qg, kg, vg, local, options);
      const auto w = mix_weight(part.lse.detach().to(acc), lse);
      const auto g = lse_grad(part.out.detach(), w);  // dL of the local part
      const auto through_out =
          torch::autograd::grad({part.out}, {qg, kg, vg}, {(rows_of(w) * d_out).to(q.scalar_type())},
                                /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
      add(dq, through_out[0]);
      add(dk, through_out[1]);
      add(dv, through_out[2]);
      // Σ_j P_ij·g_i through the scores: attention with the keys as values gives Σ_j P_ij k_j for dq, and its value
      // gradient for dO_i = scale·g_i·q_i gives Σ_i P_ij·scale·g_i·q_i for dk.
      const auto k_as_values = k.detach().requires_grad_();
      const auto with_keys = attention::dilated_attention(q.detach(), k.detach(), k_as_values, local, options);
      add(dq, rows_of(g) * with_keys.out.detach().to(acc) * scale);
      const auto through_keys = torch::autograd::grad({with_keys.out}, {k_as_values},
                                                      {(rows_of(g) * q.to(acc) * scale).to(q.scalar_type())},
                                                      /*retain_graph=*/false, /*create_graph=*/false,
                                                      /*allow_unused=*/true);
      add(dk, through_keys[0]);
    }

    const auto qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(), vg = v.detach().requires_grad_();
    std::vector<AttentionResult> parts;
    std::vector<at::Tensor> gathered(saved.begin() + 5, saved.end());  // the forward's all-gathers, reused
    mix(qg, kg, vg, local, spanning, options, group, stats, global_n, scale, acc, gathered, &parts);
    torch::autograd::variable_list outputs, output_grads;
    for (const AttentionResult& part : parts) {
      const auto w = mix_weight(part.lse.detach(), lse);
      outputs.push_back(part.out);
      output_grads.push_back(rows_of(w) * d_out);
      outputs.push_back(part.lse);
      output_grads.push_back(lse_grad(part.out.detach(), w));
    }
    const auto through_spanning = torch::autograd::grad(outputs, {qg, kg, vg}, output_grads, /*retain_graph=*/false,
                                                        /*create_graph=*/false, /*allow_unused=*/true);
    add(dq, through_spanning[0]);
    add(dk, through_spanning[1]);
    add(dv, through_spanning[2]);
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), at::Tensor()};
  }

  // F and L of the mix, in dtype `acc`, without autograd unless the inputs require it (the backward's recompute);
  // with `parts`, the spanning branches' own results are kept there and the local branches skipped. gathered[i]:
  // spanning branch i's all-gathered rows, reused when defined, else communicated and stored.
  static std::pair<at::Tensor, at::Tensor> mix(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const DilatedAttentionConfig& local,
                                               const std::vector<SpanningBranch>& spanning,
                                               const AttentionOptions& options, const ProcessGroup& group,
                                               CommStats* stats, int64_t global_n, double scale, at::ScalarType acc,
                                               std::vector<at::Tensor>& gathered,
                                               std::vector<AttentionResult>* parts) {
    std::optional<AttentionResult> total;
    if (!local.segment_lengths.empty() && parts == nullptr) {
      const auto result = attention::dilated_attention(q, k, v, local, options);
      total = AttentionResult{result.out.to(acc), result.lse.to(acc)};
    }
    at::Tensor keep;
    if (options.key_padding_mask) keep = options.key_padding_mask->logical_not();
    const int64_t H = q.size(2);
    const auto k_h = expand_kv_heads(k, H), v_h = expand_kv_heads(v, H);
    for (size_t i = 0; i < spanning.size(); ++i) {
      const auto result = spanning_branch(q, k_h, v_h, keep, spanning[i], local.causal, scale, acc, group, global_n,
                                          stats, gathered[i]);
      if (parts != nullptr) {
        parts->push_back(result);
        continue;
      }
      total = total ? attention::combine_by_lse(total->out, total->lse, result.out, result.lse) : result;
    }
    if (!total) return {};
    return {total->out, total->lse};
  }
};

std::string shape_of(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

}  // namespace

SequencePart sequence_part(int64_t n, int64_t parts, int64_t index) {
  const int64_t base = n / parts, extra = n % parts;
  return {index * base + std::min(index, extra), base + (index < extra ? 1 : 0)};
}

bool branch_spans_ranks(int64_t n, int64_t parts, int64_t segment_length) {
  const int64_t w = std::min(segment_length, n);
  for (int64_t p = 0; p < parts; ++p) {
    const SequencePart part = sequence_part(n, parts, p);
    const int64_t end = part.start + part.length;
    if (part.start % w != 0 || (end % w != 0 && end != n)) return true;
  }
  return false;
}

AttentionResult sequence_parallel_dilated_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const DilatedAttentionConfig& config,
                                                    const AttentionOptions& options, const ProcessGroup& group,
                                                    int64_t global_n, CommStats* stats) {
  config.validate();
  const std::string where = "sequence_parallel_dilated_attention: ";
  if (config.mix != attention::Mix::lse) throw ConfigError(where + "only attention.mix = lse is supported");
  if (options.relative_bias) throw ConfigError(where + "the relative position bias is not supported");
  const int64_t P = group.size();
  if (global_n < P) {
    throw Error(where + "the sequence (N=" + std::to_string(global_n) + ") must have at least one token per rank (" +
                std::to_string(P) + " ranks)");
  }
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) {
    throw Error(where + "q, k and v must be (B, n, H, D), got " + shape_of(q) + ", " + shape_of(k) + ", " +
                shape_of(v));
  }
  const SequencePart part = sequence_part(global_n, P, group.rank());
  if (q.size(1) != part.length) {
    throw Error(where + "rank " + std::to_string(group.rank()) + " of " + std::to_string(P) + " holds rows [" +
                std::to_string(part.start) + ", " + std::to_string(part.start + part.length) + ") of N=" +
                std::to_string(global_n) + " (" + std::to_string(part.length) + " rows), but q has " +
                std::to_string(q.size(1)) + " rows " + shape_of(q));
  }

  DilatedAttentionConfig local = config;
  local.segment_lengths.clear();
  local.dilation_rates.clear();
  std::vector<SpanningBranch> spanning;
  for (size_t i = 0; i < config.segment_lengths.size(); ++i) {
    if (P > 1 && branch_spans_ranks(global_n, P, config.segment_lengths[i])) {
      spanning.push_back({std::min(config.segment_lengths[i], global_n), config.dilation_rates[i]});
    } else {
      local.segment_lengths.push_back(config.segment_lengths[i]);
      local.dilation_rates.push_back(config.dilation_rates[i]);
    }
  }
  // Every branch local: the single-device function on this rank's rows is the exact answer, with any backend.
  if (spanning.empty()) return attention::dilated_attention(q, k, v, config, options);

  const int64_t H = q.size(2), D = q.size(3);
  if (k.size(0) != q.size(0) || k.size(1) != q.size(1) || k.size(3) != D || H % k.size(2) != 0 ||
      v.sizes() != k.sizes()) {
    throw Error(where + "k and v must be (B, n, Hkv, D) with H % Hkv == 0 for q " + shape_of(q) + ", got " +
                shape_of(k) + " and " + shape_of(v));
  }
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));

  if (options.key_padding_mask) {
    const at::Tensor& mask = *options.key_padding_mask;
    if (mask.dim() != 2 || mask.size(0) != q.size(0) || mask.size(1) != q.size(1) || mask.scalar_type() != at::kBool) {
      throw Error(where + "key_padding_mask must be (B, n) bool for q " + shape_of(q) + ", got " + shape_of(mask));
    }
  }
  const Plan plan{local, spanning, options, &group, stats, global_n, scale};
  auto result = SequenceParallelFunction::apply(q, k, v, reinterpret_cast<int64_t>(&plan));
  return {result[0], result[1]};
}

}  // namespace longnet::distributed
