// GCC 12/13 at -O3 reports a false -Wstringop-overflow in libstdc++'s string concatenation inlined here; the pragmas
// precede every include so that they cover those locations.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wrestrict"
#endif
#include "pipelines/ablation.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "pipelines/run.h"

namespace longnet::pipelines {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string rate_text(double rate) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", rate);
  return buf;
}

std::string run_name(const std::string& strategy, double rate, int64_t seed) {
  return strategy + "-missing" + rate_text(rate) + "-seed" + std::to_string(seed);
}

json read_json(const fs::path& file) {
  std::ifstream in(file);
  try {
    return json::parse(in);
  } catch (const std::exception& e) {
    throw DataError(file.string() + ": not valid JSON (" + e.what() + ")");
  }
}

std::string fixed(double x, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, x);
  return buf;
}

void write_tables(const AblationResult& r, const ExperimentConfig& c) {
  const auto pairs = ablation_pairs(r);
  std::ostringstream csv;
  csv << "strategy,missing_rate,seed,final_train_loss,train_seconds";
  for (const auto& p : pairs) csv << "," << p << "_r1," << p << "_r5," << p << "_r10," << p << "_median_rank";
  csv << "\n";
  for (const auto& run : r.runs) {
    csv << run.strategy << "," << rate_text(run.missing_rate) << "," << run.seed << ","
        << run.summary.value("final_train_loss", 0.0) << "," << run.summary.value("train_seconds", 0.0);
    const json& retrieval = run.summary.contains("retrieval") ? run.summary["retrieval"] : json::object();
    for (const auto& p : pairs) {
      for (const char* k : {"r1", "r5", "r10", "median_rank"}) {
        csv << ",";
        if (retrieval.contains(p)) csv << retrieval[p].value(k, 0.0);
      }
    }
    csv << "\n";
  }
  write_file_atomic(r.dir / "ablation.csv", csv.str());

  std::ostringstream md;
  md << "# Fusion ablation: " << c.run.name << "\n\n"
     << "Held-out (" << c.eval.split << " split) retrieval R@1 in percent, mean ± standard deviation over "
     << c.ablate.seeds.size() << " seed(s); " << c.train.steps << " training steps per run; chance is 100 / gallery "
     << "size. text_to_media ranks the fused embedding of each sample's media (the fusion strategy's output) for "
     << "each caption; the missing rate drops each medium of a sample with that probability in training and in the "
     << "media fusion of the evaluation.\n\n| strategy | missing rate |";
  for (const auto& p : pairs) md << " " << p << " R@1 |";
  md << "\n|---|---|";
  for (size_t i = 0; i < pairs.size(); ++i) md << "---|";
  md << "\n";
  for (const auto& strategy : c.ablate.strategies) {
    for (const double rate : c.ablate.missing_rates) {
      md << "| " << strategy << " | " << rate_text(rate) << " |";
      for (const auto& p : pairs) {
        const auto s = cell_stat(r, strategy, rate, p, "r1");
        if (s.count == 0) {
          md << " – |";
        } else {
          md << " " << fixed(s.mean, 1) << (s.count > 1 ? " ± " + fixed(s.stddev, 1) : "") << " (chance "
             << fixed(s.chance, 1) << ") |";
        }
      }
      md << "\n";
    }
  }
  write_file_atomic(r.dir / "ablation.md", md.str());
}

}  // namespace

std::vector<std::string> ablation_pairs(const AblationResult& result) {
  std::set<std::string> seen;
  for (const auto& run : result.runs) {
    if (!run.summary.contains("retrieval")) continue;
    for (const auto& [pair, _] : run.summary["retrieval"].items()) seen.insert(pair);
  }
  std::vector<std::string> pairs;
  if (seen.erase("text_to_media") > 0) pairs.push_back("text_to_media");
  pairs.insert(pairs.end(), seen.begin(), seen.end());
  return pairs;
}

CellStat cell_stat(const AblationResult& result, const std::string& strategy, double missing_rate,
                   const std::string& pair, const std::string& metric) {
  std::vector<double> values;
  CellStat s;
  for (const auto& run : result.runs) {
    if (run.strategy != strategy || run.missing_rate != missing_rate) continue;
    const json& retrieval = run.summary.contains("retrieval") ? run.summary["retrieval"] : json::object();
    if (!retrieval.contains(pair)) continue;
    values.push_back(retrieval[pair].value(metric, 0.0));
    s.chance = retrieval[pair].value("chance_r1", 0.0);
  }
  s.count = static_cast<int64_t>(values.size());
  if (values.empty()) return s;
  for (double v : values) s.mean += v / static_cast<double>(values.size());
  if (values.size() > 1) {
    double ss = 0;
    for (double v : values) ss += (v - s.mean) * (v - s.mean);
    s.stddev = std::sqrt(ss / static_cast<double>(values.size() - 1));
  }
  return s;
}

AblationResult run_ablation(const ExperimentConfig& c) {
  if (c.run.task != "multimodal") {
    throw ConfigError(c.source.string() + ": run.task must be \"multimodal\" for an ablation, got \"" + c.run.task +
                      "\"");
  }
  AblationResult result;
  result.dir = fs::path(c.run.output_dir) / (c.run.name + "-ablation");
  const fs::path runs = result.dir / "runs";
  std::error_code ec;
  fs::create_directories(runs, ec);
  if (ec) throw IoError("cannot create '" + runs.string() + "': " + ec.message());
  const size_t total = c.ablate.strategies.size() * c.ablate.missing_rates.size() * c.ablate.seeds.size();
  size_t done = 0;
  for (const auto& strategy : c.ablate.strategies) {
    for (const double rate : c.ablate.missing_rates) {
      for (const int64_t seed : c.ablate.seeds) {
        ++done;
        ExperimentConfig run = c;
        run.multimodal.fusion.strategy = strategy;
        run.data.missing_rate = rate;
        run.run.seed = seed;
        run.run.name = run_name(strategy, rate, seed);
        run.run.output_dir = runs.string();
        const fs::path dir = runs / run.run.name;
        const std::string label = "[" + std::to_string(done) + "/" + std::to_string(total) + "] " + run.run.name;
        if (fs::exists(dir / "summary.json")) {
          log::info("ablate " + label + ": finished earlier, reading " + (dir / "summary.json").string());
        } else if (fs::exists(dir)) {
          log::info("ablate " + label + ": resuming");
          run_experiment(run, {.resume = dir});
        } else {
          log::info("ablate " + label);
          run_experiment(run);
        }
        result.runs.push_back({strategy, rate, seed, dir, read_json(dir / "summary.json")});
      }
    }
  }
  write_tables(result, c);
  log::info("ablate: wrote " + (result.dir / "ablation.csv").string() + " and " +
            (result.dir / "ablation.md").string());
  return result;
}

}  // namespace longnet::pipelines
