// `bench_mlp`: the GELU MLP of a block (fc2(gelu_tanh(fc1(x)))) forward + backward, composed of torch operators vs
// fusion/gelu_mlp.h, and each piece that the epilogues replace, one way against the other. Prints a table and, with
// --json PATH, writes the records there. Needs a CUDA device.
//
//   bench_mlp --rows 125440 --json results/h100_mlp.json     # a video_text_gpu batch: 4 × 31,360 video tokens
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "bench/bench_main.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "fusion/gelu_mlp.h"

#ifdef LONGNET_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>

#include "fusion/kernels/gemm_epilogue.h"
#endif

namespace {

using namespace longnet;
using nlohmann::json;

struct Options {
  int64_t rows = 125440, width = 768, hidden = 3072;
  int64_t warmup = 3, iters = 20;
  std::string json_path;
};

#ifdef LONGNET_WITH_CUDA

// Median milliseconds of fn over o.iters runs, each timed by CUDA events on the current stream.
double time_ms(const Options& o, const std::function<void()>& fn) {
  for (int64_t i = 0; i < o.warmup; ++i) fn();
  std::vector<double> ms;
  for (int64_t i = 0; i < o.iters; ++i) {
    at::cuda::CUDAEvent start(cudaEventDefault), end(cudaEventDefault);
    start.record();
    fn();
    end.record();
    end.synchronize();
    ms.push_back(start.elapsed_time(end));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

fusion::kernels::GemmEpilogueParams lt(fusion::kernels::GemmEpilogue e) {
  fusion::kernels::GemmEpilogueParams p;
  p.handle = at::cuda::getCurrentCUDABlasLtHandle();
  p.workspace = at::cuda::getCUDABlasLtWorkspace();
  p.workspace_bytes = at::cuda::getCUDABlasLtWorkspaceSize();
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  p.dtype = fusion::kernels::ElementType::bfloat16;
  p.epilogue = e;
  return p;
}

int run(const Options& o) {
  if (!torch::cuda::is_available()) {
    std::cerr << "bench_mlp: needs a CUDA device, and torch sees none; nothing was measured\n";
    return 1;
  }
  if (o.rows < 1 || o.width < 8 || o.hidden < 8 || o.width % 8 != 0 || o.hidden % 8 != 0 || o.iters < 1) {
    throw ConfigError("--rows >= 1, --width and --hidden multiples of 8, --iters >= 1");
  }
  using fusion::kernels::GemmEpilogue;
  const int64_t n = o.rows, c = o.width, h = o.hidden;
  torch::manual_seed(0);
  const auto bf = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16);
  const auto x = torch::randn({n, c}, bf), dy = torch::randn({n, c}, bf);
  const auto w1 = torch::randn({h, c}, bf) / std::sqrt(static_cast<double>(c)), b1 = torch::randn({h}, bf);
  const auto w2 = torch::randn({c, h}, bf) / std::sqrt(static_cast<double>(h)), b2 = torch::randn({c}, bf);
  auto pre = at::empty({n, h}, bf), act = at::empty({n, h}, bf), dpre = at::empty({n, h}, bf);
  auto dw2 = at::empty({c, h}, bf), db1 = at::empty({h}, bf), db2 = at::empty({c}, bf);

  struct Row {
    std::string piece, way;
    double ms;
  };
  std::vector<Row> rows;
  const auto add = [&](const std::string& piece, const std::string& way, const std::function<void()>& fn) {
    rows.push_back({piece, way, time_ms(o, fn)});
  };

  add("fc1 + gelu", "addmm, gelu", [&] { at::gelu(at::addmm(b1, x, w1.t()), "tanh"); });
  add("fc1 + gelu", "gelu_aux_bias epilogue", [&] {
    auto p = lt(GemmEpilogue::bias_gelu_aux);
    p.transpose_a = true, p.m = h, p.n = n, p.k = c, p.a = w1.data_ptr(), p.lda = c, p.b = x.data_ptr(), p.ldb = c;
    p.d = act.data_ptr(), p.ldd = h, p.aux = pre.data_ptr(), p.bias = b1.data_ptr();
    fusion::kernels::launch_gemm_epilogue(p);
  });
  add("dpre, db1", "mm, gelu_backward, sum", [&] { at::gelu_backward(at::mm(dy, w2), pre, "tanh").sum(0); });
  const auto dgelu = [&](GemmEpilogue e) {
    auto p = lt(e);
    p.m = h, p.n = n, p.k = c, p.a = w2.data_ptr(), p.lda = h, p.b = dy.data_ptr(), p.ldb = c;
    p.d = dpre.data_ptr(), p.ldd = h, p.aux = pre.data_ptr(), p.bias = db1.data_ptr();
    fusion::kernels::launch_gemm_epilogue(p);
  };
  add("dpre, db1", "dgelu epilogue, sum", [&] {
    dgelu(GemmEpilogue::dgelu);
    dpre.sum(0);
  });
  add("dpre, db1", "dgelu_bgrad epilogue", [&] { dgelu(GemmEpilogue::dgelu_bgrad); });
  add("dW2, db2", "mm, sum", [&] {
    at::mm(dy.t(), act);
    dy.sum(0);
  });
  add("dW2, db2", "bgradb epilogue", [&] {
    auto p = lt(GemmEpilogue::bgradb);
    p.transpose_b = true, p.m = h, p.n = c, p.k = n, p.a = act.data_ptr(), p.lda = h, p.b = dy.data_ptr(), p.ldb = c;
    p.d = dw2.data_ptr(), p.ldd = h, p.bias = db2.data_ptr();
    fusion::kernels::launch_gemm_epilogue(p);
  });
  const auto leaf = [](const at::Tensor& t) { return t.detach().requires_grad_(); };
  std::vector<at::Tensor> g{leaf(x), leaf(w1), leaf(b1), leaf(w2), leaf(b2)};
  const auto fresh = [&g] {  // no gradient accumulation inside the timing
    for (auto& t : g) t.mutable_grad() = at::Tensor();
  };
  add("MLP forward + backward", "composed (linear, gelu, linear)", [&] {
    fresh();
    at::linear(at::gelu(at::linear(g[0], g[1], g[2]), "tanh"), g[3], g[4]).backward(dy);
  });
  add("MLP forward + backward", "gelu_mlp", [&] {
    fresh();
    fusion::gelu_mlp(g[0], g[1], g[2], g[3], g[4]).backward(dy);
  });

  std::printf("GELU MLP pieces: rows %lld, width %lld, hidden %lld, bf16 (median of %lld)\n",
              static_cast<long long>(n), static_cast<long long>(c), static_cast<long long>(h),
              static_cast<long long>(o.iters));
  std::printf("%-24s %-34s %10s\n", "piece", "way", "ms");
  json records = json::array();
  for (const Row& r : rows) {
    std::printf("%-24s %-34s %10.3f\n", r.piece.c_str(), r.way.c_str(), r.ms);
    records.push_back({{"piece", r.piece}, {"way", r.way}, {"median_ms", r.ms}});
  }
  if (!o.json_path.empty()) {
    const json doc{{"benchmark", "gelu_mlp"},
                   {"device", at::cuda::getCurrentDeviceProperties()->name},
                   {"dtype", "bf16"},
                   {"rows", n},
                   {"width", c},
                   {"hidden", h},
                   {"iters", o.iters},
                   {"records", records}};
    write_file_atomic(o.json_path, doc.dump(2) + "\n");
    std::printf("wrote %s\n", o.json_path.c_str());
  }
  return 0;
}

#else

int run(const Options&) {
  std::cerr << "bench_mlp: this build has no CUDA (configure with LONGNET_CUDA=ON); nothing was measured\n";
  return 1;
}

#endif

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"GELU MLP forward+backward: torch operators vs GEMM epilogues, piece by piece"};
  Options o;
  app.add_option("--rows", o.rows, "Tokens (rows of x)")->capture_default_str();
  app.add_option("--width", o.width, "C")->capture_default_str();
  app.add_option("--hidden", o.hidden, "Hidden width")->capture_default_str();
  app.add_option("--warmup", o.warmup, "Untimed runs first")->capture_default_str();
  app.add_option("--iters", o.iters, "Timed runs")->capture_default_str();
  app.add_option("--json", o.json_path, "Write the records to this JSON file");
  CLI11_PARSE(app, argc, argv);
  return longnet::bench::run_reporting_errors([&o] { return run(o); });
}
