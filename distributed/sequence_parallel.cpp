#include "distributed/sequence_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
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

struct SpanningBranch {
  int64_t segment_length = 0;  // clamped to N
  int64_t rate = 1;
};

// The rows of this rank a spanning branch selects, all heads at once: head h reads the positions ≡ h (mod r), i.e.
// local rows f_h, f_h + r, ... (count_h of them, f_h = (h - start) mod r). Each head gets `slots` =
// ⌈n/r⌉ slots (count_h is slots or one less); a slot past count_h is invalid and points at a row head h does not
// select, so writing that row's unchanged value back cannot clash with a valid slot. Built on the device: the
// heads are batched into one attention call, which keeps the number of kernel launches independent of H and r.
struct Selection {
  int64_t slots = 0;
  at::Tensor rows;       // (H, slots) int64, local rows
  at::Tensor valid;      // (H, slots) bool
  at::Tensor positions;  // (H, slots) int64, global positions of the valid slots
};

Selection select_rows(const SequencePart& part, int64_t r, int64_t heads, const at::TensorOptions& long_options) {
  const int64_t n = part.length;
  Selection sel;
  sel.slots = (n + r - 1) / r;
  const auto offset = at::remainder(at::arange(heads, long_options), r);           // (H,)
  const auto first = at::remainder(offset - part.start, r).view({heads, 1});       // f_h
  const auto rows = first + at::arange(sel.slots, long_options).mul(r).view({1, sel.slots});
  sel.valid = rows < n;
  sel.rows = at::where(sel.valid, rows, at::remainder(first + 1, n));
  sel.positions = rows + part.start;
  return sel;
}

// x (B, n, H, E) -> its selected rows (B, H, slots, E).
at::Tensor gather_rows(const at::Tensor& x, const Selection& sel) {
  const auto index = sel.rows.view({1, x.size(2), sel.slots, 1}).expand({x.size(0), x.size(2), sel.slots, x.size(3)});
  return x.transpose(1, 2).gather(2, index);
}

// lse (B, H, n) -> its selected entries (B, H, slots).
at::Tensor gather_lse(const at::Tensor& lse, const Selection& sel) {
  return lse.gather(2, sel.rows.unsqueeze(0).expand({lse.size(0), lse.size(1), sel.slots}));
}

// Writes (add = false) or adds src (B, H, slots, E) into the selected rows of x (B, n, H, E), in place.
void scatter_rows(at::Tensor& x, const Selection& sel, const at::Tensor& src, bool add) {
  const auto index = sel.rows.view({1, x.size(2), sel.slots, 1}).expand({x.size(0), x.size(2), sel.slots, x.size(3)});
  auto view = x.transpose(1, 2);
  if (add) {
    view.scatter_add_(2, index, src.to(x.scalar_type()));
  } else {
    view.scatter_(2, index, src.to(x.scalar_type()));
  }
}

// Slots [begin, begin + count) of a selection.
Selection slots_of(const Selection& sel, int64_t begin, int64_t count) {
  return {count, sel.rows.narrow(1, begin, count), sel.valid.narrow(1, begin, count),
          sel.positions.narrow(1, begin, count)};
}

// The ranks [first, first + count) whose parts meet the segments of branch `w` that this part's rows lie in: only
// their gathered rows hold keys these queries can read.
struct RankWindow {
  int64_t first = 0, count = 0;
};
RankWindow rank_window(const SequencePart& part, int64_t w, int64_t P, int64_t global_n) {
  const int64_t seg_lo = (part.start / w) * w;
  const int64_t seg_hi = std::min(global_n, ((part.start + part.length - 1) / w + 1) * w);
  int64_t lo = P, hi = -1;
  for (int64_t p = 0; p < P; ++p) {
    const SequencePart other = sequence_part(global_n, P, p);
    if (other.start < seg_hi && other.start + other.length > seg_lo) {
      lo = std::min(lo, p);
      hi = std::max(hi, p);
    }
  }
  return {lo, hi - lo + 1};
}

// Slots per attention call of a spanning branch: the (B, H, slots, keys) float32 scores stay within
// LONGNET_SP_SCORE_ELEMENTS elements (default 2^27, 512 MiB; the masks, weights and the backward's saved tensors are
// a few times that), so that a long sequence with a strongly dilated branch does not need memory for every query
// against every gathered key at once.
int64_t slots_per_call(int64_t batch, int64_t heads, int64_t keys, int64_t slots) {
  int64_t budget = int64_t{1} << 27;
  if (const char* env = std::getenv("LONGNET_SP_SCORE_ELEMENTS")) budget = std::max<int64_t>(1, std::atoll(env));
  const int64_t per_slot = std::max<int64_t>(1, batch * heads * keys);
  return std::clamp<int64_t>(budget / per_slot, 1, std::max<int64_t>(1, slots));
}

// Send buffer of a spanning branch (B, rows_max, H, 2D+1): for head h, row j holds the key/value of its slot j; the
// last channel is 1 for a real, unpadded key and 0 otherwise (invalid slots and rows past the slots stay 0).
// k, v: (B, n, H, D) (kv heads already expanded); keep: (B, n) bool or undefined.
at::Tensor pack_rows(const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep, const Selection& sel,
                     int64_t rows_max) {
  const int64_t B = k.size(0), n = k.size(1), H = k.size(2), D = k.size(3);
  auto keep_rows = sel.valid.unsqueeze(0).expand({B, H, sel.slots});
  if (keep.defined()) {
    keep_rows = keep_rows.logical_and(keep.unsqueeze(1).expand({B, H, n}).gather(
                                          2, sel.rows.unsqueeze(0).expand({B, H, sel.slots})));
  }
  auto send = at::zeros({B, rows_max, H, 2 * D + 1}, k.options());
  send.narrow(1, 0, sel.slots)
      .copy_(at::cat({gather_rows(k, sel), gather_rows(v, sel), keep_rows.unsqueeze(-1).to(k.scalar_type())}, -1)
                 .transpose(1, 2));
  return send;
}

// One spanning branch on this rank's selected queries q_sel (B, H, slots, D) against the all-gathered rows of every
// rank (P, B, rows_max, H, 2D+1): out (B, H, slots, D) and lse (B, H, slots) in dtype `acc` (invalid slots: no keys).
AttentionResult attend_gathered(const at::Tensor& q_sel, const Selection& sel, const at::Tensor& all_rows,
                                const SpanningBranch& branch, bool causal, double scale, at::ScalarType acc, int64_t P,
                                int64_t rank, int64_t global_n) {
  const int64_t B = all_rows.size(1), rows_max = all_rows.size(2), H = all_rows.size(3);
  const int64_t D = (all_rows.size(4) - 1) / 2, w = branch.segment_length, r = branch.rate;
  const SequencePart part = sequence_part(global_n, P, rank);

  const RankWindow window = rank_window(part, w, P, global_n);
  const int64_t rank_lo = window.first, R = window.count, keys = R * rows_max;
  const auto kv = all_rows.narrow(0, rank_lo, R).permute({1, 3, 0, 2, 4}).reshape({B, H, keys, 2 * D + 1});
  const auto key_ok = kv.select(3, 2 * D).gt(0.5).unsqueeze(2);  // (B, H, 1, keys)

  // Which gathered rows each query may read: same segment, and not after the query when causal. Row j of rank p for
  // head h sits at start_p + (h mod r - start_p) mod r + j·r (sequence_part's formula as tensor ops, on the device).
  const auto long_options = q_sel.options().dtype(at::kLong);
  const auto ranks = at::arange(rank_lo, rank_lo + R, long_options).view({1, R});
  const auto rank_start = ranks * (global_n / P) + at::clamp_max(ranks, global_n % P);          // (1, R)
  const auto offset = at::remainder(at::arange(H, long_options), r).view({H, 1});             // (H, 1)
  const auto rank_first = rank_start + at::remainder(offset - rank_start, r);                  // (H, R)
  const auto key_pos =
      (rank_first.unsqueeze(2) + at::arange(rows_max, long_options).mul(r).view({1, 1, rows_max})).view({H, 1, keys});
  const auto query_pos = sel.positions.unsqueeze(2);  // (H, slots, 1)
  auto allowed = key_pos.div(w, "floor").eq(query_pos.div(w, "floor")).logical_and(sel.valid.unsqueeze(2));
  if (causal) allowed = allowed.logical_and(key_pos.le(query_pos));
  allowed = allowed.unsqueeze(0).logical_and(key_ok);  // (B, H, slots, keys)

  // Masked softmax as in the reference backend: rows without keys get out = 0 and lse = -inf with finite gradients.
  return attention::masked_softmax_attention(q_sel, kv.narrow(3, 0, D), kv.narrow(3, D, D), allowed, at::Tensor(),
                                             scale, acc);
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

// The local branches and the spanning branches, mixed by their LSEs. The forward runs without autograd: the local
// branches give the full-size output F and LSE L, and each spanning branch, whose queries are a 1/r subset of the
// rows, is merged into the rows it selects in place, so its cost follows the rows it selects, not N.
// The backward differentiates each part with the merged output F and LSE L: a part b with output O_b and LSE L_b
// enters F with weight w_b = exp(L_b - L), so dO_b = w_b·dF and dL_b = w_b·(dF·(O_b - F) + dL). The local branches may
// run on a backend whose LSE carries no gradient (flash): their dL_b is applied as Σ_j P_ij·dL_b,i, i.e.
//   dq_i += scale·dL_b,i·Σ_j P_ij k_j       (attention with the keys as values), and
//   dk_j += Σ_i P_ij·scale·dL_b,i·q_i       (the value gradient of that same attention),
// so only the output gradients of the backend are used. The spanning branches are recomputed with autograd on the
// selected query rows and the rows the forward all-gathered (kept); the backward of that all-gather reduce-scatters,
// and the compact gradients are added into the selected rows of dq, dk, dv.
class SequenceParallelFunction : public torch::autograd::Function<SequenceParallelFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, int64_t plan_address) {
    const Plan& plan = *reinterpret_cast<const Plan*>(plan_address);
    const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t H = q.size(2), P = plan.group->size();
    const SequencePart part = sequence_part(plan.global_n, P, plan.group->rank());

    at::Tensor out, lse;  // F in q's dtype, L in `acc`
    if (!plan.local.segment_lengths.empty()) {
      const auto result = attention::dilated_attention(q, k, v, plan.local, plan.options);
      out = result.out.to(q.scalar_type());
      lse = result.lse.to(acc);
    } else {
      out = at::zeros_like(q);
      lse = at::full({q.size(0), H, q.size(1)}, kNegInf, q.options().dtype(acc));
    }
    at::Tensor keep;
    if (plan.options.key_padding_mask) keep = plan.options.key_padding_mask->logical_not();
    const auto k_h = expand_kv_heads(k, H), v_h = expand_kv_heads(v, H);
    std::vector<at::Tensor> gathered(plan.spanning.size());
    const auto long_options = q.options().dtype(at::kLong);
    for (size_t i = 0; i < plan.spanning.size(); ++i) {
      const SpanningBranch& branch = plan.spanning[i];
      const Selection sel = select_rows(part, branch.rate, H, long_options);
      const auto send = pack_rows(k_h, v_h, keep, sel, rows_max(plan.global_n, P, branch.rate));
      gathered[i] = GatherRows::apply(send, reinterpret_cast<int64_t>(&gathered[i]),
                                      reinterpret_cast<int64_t>(plan.group), reinterpret_cast<int64_t>(plan.stats));
      const int64_t keys = rank_window(part, branch.segment_length, P, plan.global_n).count * send.size(1);
      const int64_t step = slots_per_call(q.size(0), H, keys, sel.slots);
      for (int64_t begin = 0; begin < sel.slots; begin += step) {
        const Selection chunk = slots_of(sel, begin, std::min(step, sel.slots - begin));
        const auto result = attend_gathered(gather_rows(q, chunk), chunk, gathered[i], branch, plan.local.causal,
                                            plan.scale, acc, P, plan.group->rank(), plan.global_n);
        // (B, slots, H, ·) views for combine_by_lse's (B, N, H, D) / (B, H, N) layout
        const auto merged = attention::combine_by_lse(gather_rows(out, chunk).to(acc).transpose(1, 2),
                                                      gather_lse(lse, chunk), result.out.transpose(1, 2), result.lse);
        scatter_rows(out, chunk, merged.out.transpose(1, 2), /*add=*/false);
        lse.scatter_(2, chunk.rows.unsqueeze(0).expand({lse.size(0), H, chunk.slots}), merged.lse);
      }
    }

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
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const auto acc = lse.scalar_type();
    const auto d_out = grads[0].defined() ? grads[0].to(out.scalar_type()) : at::zeros_like(out);
    const at::Tensor& d_lse = grads[1];  // undefined when nothing flows into the LSE

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
    const int64_t H = q.size(2), P = group.size();
    const SequencePart part = sequence_part(global_n, P, group.rank());
    torch::AutoGradMode enable_grad(true);

    // The local branches on a CUDA backend (flash or fused), when nothing flows into the returned LSE (training
    // losses read the output only): each fused backward run with the merged output and LSE of the whole mix gives
    // these branches' exact share of the gradient directly (attention/flash_backend.h), without recomputing them.
    // Their gradients, in q's dtype, then take the spanning branches' share in place.
    const bool fast_local = !local.segment_lengths.empty() && !d_lse.defined() &&
                            attention::resolve_backend(q, local, options) != attention::Backend::reference;
    at::Tensor dq, dk, dv;
    if (fast_local) {
      std::tie(dq, dk, dv) =
          attention::flash_dilated_attention_backward(q, k, v, out, lse.to(at::kFloat), d_out, local, options);
    } else {
      dq = at::zeros(q.sizes(), q.options().dtype(acc));
      dk = at::zeros(k.sizes(), k.options().dtype(acc));
      dv = at::zeros(v.sizes(), v.options().dtype(acc));
    }
    auto add = [](at::Tensor& sum, const at::Tensor& part_grad) {
      if (part_grad.defined()) sum.add_(part_grad.to(sum.scalar_type()));
    };
    if (!fast_local && !local.segment_lengths.empty()) {
      const auto out_acc = out.to(acc), d_out_acc = d_out.to(acc);
      const auto qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(), vg = v.detach().requires_grad_();
      const auto result = attention::dilated_attention(qg, kg, vg, local, options);
      const auto w = mix_weight(result.lse.detach().to(acc), lse);
      // dL of the local part: w·(dF·(O - F) + dL)
      auto g = (d_out_acc * (result.out.detach().to(acc) - out_acc)).sum(-1).permute({0, 2, 1});
      if (d_lse.defined()) g = g + d_lse.to(acc);
      g = w * g;
      const auto through_out =
          torch::autograd::grad({result.out}, {qg, kg, vg}, {(rows_of(w) * d_out_acc).to(q.scalar_type())},
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

    // Spanning branches, on the selected rows only. Their key and value gradients arrive per query head; with grouped
    // kv heads they are summed into the kv heads at the end.
    const bool grouped = k.size(2) != H;
    at::Tensor dk_h = grouped ? at::zeros(q.sizes(), q.options().dtype(acc)) : dk;
    at::Tensor dv_h = grouped ? at::zeros(q.sizes(), q.options().dtype(acc)) : dv;
    std::vector<at::Tensor> gathered(saved.begin() + 5, saved.end());  // the forward's all-gathers, reused
    const auto long_options = q.options().dtype(at::kLong);
    const int64_t D = q.size(3);
    for (size_t i = 0; i < spanning.size(); ++i) {
      const Selection sel = select_rows(part, spanning[i].rate, H, long_options);
      // The values come from the kept all-gather; this leaf only carries the reduce-scattered gradient back.
      const auto send = at::zeros(gathered[i].sizes().slice(1), gathered[i].options()).requires_grad_();
      const auto all_rows = GatherRows::apply(send, reinterpret_cast<int64_t>(&gathered[i]),
                                              reinterpret_cast<int64_t>(&group), reinterpret_cast<int64_t>(stats));
      // Each chunk of slots is recomputed and differentiated on its own (bounded memory); the gradients of the
      // gathered rows add up and go back through the all-gather once.
      const auto keys_in = all_rows.detach().requires_grad_();
      at::Tensor d_rows = at::zeros_like(keys_in);
      const int64_t keys = rank_window(part, spanning[i].segment_length, P, global_n).count * send.size(1);
      const int64_t step = slots_per_call(q.size(0), H, keys, sel.slots);
      for (int64_t begin = 0; begin < sel.slots; begin += step) {
        const Selection chunk = slots_of(sel, begin, std::min(step, sel.slots - begin));
        const auto q_sel = gather_rows(q, chunk).detach().requires_grad_();
        const auto result =
            attend_gathered(q_sel, chunk, keys_in, spanning[i], local.causal, scale, acc, P, group.rank(), global_n);
        const auto lse_sel = gather_lse(lse, chunk);                // (B, H, slots)
        const auto out_sel = gather_rows(out, chunk).to(acc);       // (B, H, slots, D)
        const auto d_out_sel = gather_rows(d_out, chunk).to(acc);
        const auto w = mix_weight(result.lse.detach(), lse_sel);    // 0 on invalid slots (no keys)
        auto g = (d_out_sel * (result.out.detach() - out_sel)).sum(-1);
        if (d_lse.defined()) g = g + gather_lse(d_lse, chunk).to(acc);
        const auto input_grads =
            torch::autograd::grad({result.out, result.lse}, {q_sel, keys_in}, {w.unsqueeze(-1) * d_out_sel, w * g},
                                  /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
        if (input_grads[0].defined()) scatter_rows(dq, chunk, input_grads[0], /*add=*/true);
        if (input_grads[1].defined()) d_rows.add_(input_grads[1]);
      }
      const auto d_send = torch::autograd::grad({all_rows}, {send}, {d_rows})[0];  // reduce-scattered: own rows
      const auto rows = d_send.narrow(1, 0, sel.slots).transpose(1, 2);            // (B, H, slots, 2D+1)
      scatter_rows(dk_h, sel, rows.narrow(3, 0, D), /*add=*/true);
      scatter_rows(dv_h, sel, rows.narrow(3, D, D), /*add=*/true);
    }
    if (grouped) {
      const int64_t B = k.size(0), n = k.size(1), Hkv = k.size(2);
      add(dk, dk_h.view({B, n, Hkv, H / Hkv, D}).sum(3));
      add(dv, dv_h.view({B, n, Hkv, H / Hkv, D}).sum(3));
    }
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), at::Tensor()};
  }

 private:
  // Rows per rank in a branch's send buffer: those of the longest part (part 0).
  static int64_t rows_max(int64_t global_n, int64_t P, int64_t r) {
    return (sequence_part(global_n, P, 0).length + r - 1) / r;
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

attention::SequenceShard sequence_shard(const ProcessGroup& group, int64_t global_n, CommStats* stats) {
  const SequencePart part = sequence_part(global_n, group.size(), group.rank());
  return {part.start, global_n,
          [&group, global_n, stats](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const DilatedAttentionConfig& config, const AttentionOptions& options) {
            return sequence_parallel_dilated_attention(q, k, v, config, options, group, global_n, stats);
          }};
}

}  // namespace longnet::distributed
