// `longnet model summary CONFIG [--set key=value]... [--length N | --length modality=N]...`: the multimodal model of an
// experiment ([model], [attention], [fusion], [modalities.*]) with its parameters and forward FLOPs per component
// (each encoder, each stack, the fusion, the heads) for one sample with the given number of tokens per modality.
#include <cinttypes>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "apps/longnet/commands.h"
#include "core/error.h"
#include "fusion/multimodal_model.h"
#include "pipelines/experiment_config.h"

namespace longnet::app {
namespace {

constexpr int64_t kDefaultLength = 256;

struct SummaryOptions {
  std::string config;
  std::vector<std::string> sets;
  std::vector<std::string> lengths;  // "N" (every modality) or "modality=N"
};

int64_t parse_count(const std::string& text, const std::string& given) {
  size_t used = 0;
  int64_t n = -1;
  try {
    n = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || n < 0) {
    throw ConfigError("--length " + given + ": expected N or modality=N with an integer N >= 0");
  }
  return n;
}

std::array<int64_t, modalities::kModalityCount> resolve_lengths(const std::vector<std::string>& given,
                                                                const fusion::MultimodalConfig& config) {
  std::array<int64_t, modalities::kModalityCount> lengths{};
  lengths.fill(kDefaultLength);
  for (const auto& g : given) {
    const size_t eq = g.find('=');
    if (eq == std::string::npos) {
      lengths.fill(parse_count(g, g));
      continue;
    }
    const std::string name = g.substr(0, eq);
    const auto m = modalities::parse_modality(name);
    if (!m) throw ConfigError("--length " + g + ": unknown modality \"" + name + "\" (text, image, video, audio)");
    if (!config[*m].enabled) throw ConfigError("--length " + g + ": modality " + name + " is not enabled");
    lengths[static_cast<size_t>(*m)] = parse_count(g.substr(eq + 1), g);
  }
  return lengths;
}

std::string human(double x) {
  const char* units[] = {"", "K", "M", "G", "T", "P"};
  int u = 0;
  while (x >= 1000.0 && u < 5) {
    x /= 1000.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f" : "%.2f%s", x, units[u]);
  return buf;
}

void run_summary(const SummaryOptions& options) {
  const auto exp = pipelines::load_experiment(options.config, options.sets);
  if (!exp.multimodal.any_enabled()) {
    throw ConfigError(options.config + ": no modality is enabled ([modalities.text|image|video|audio] with enabled = "
                      "true), so there is no multimodal model to describe");
  }
  const auto lengths = resolve_lengths(options.lengths, exp.multimodal);
  fusion::MultimodalModel model(exp.model, exp.attention, exp.multimodal);
  const auto parts = model->summary(lengths);

  std::string length_text;
  for (auto m : modalities::kAllModalities) {
    if (!exp.multimodal[m].enabled) continue;
    length_text += (length_text.empty() ? "" : ", ") + modalities::to_string(m) + " " +
                   std::to_string(lengths[static_cast<size_t>(m)]);
  }
  std::printf("multimodal model of %s: width %" PRId64 ", %" PRId64 " heads, fusion \"%s\"\n", options.config.c_str(),
              exp.model.width, exp.model.heads, exp.multimodal.fusion.strategy.c_str());
  std::printf("tokens per sample: %s\n\n", length_text.c_str());
  std::printf("%-24s %14s %14s %12s\n", "component", "parameters", "forward FLOPs", "");
  int64_t total_params = 0;
  double total_flops = 0;
  for (const auto& p : parts) {
    std::printf("%-24s %14" PRId64 " %14.6g %12s\n", p.name.c_str(), p.parameters, p.forward_flops,
                human(p.forward_flops).c_str());
    total_params += p.parameters;
    total_flops += p.forward_flops;
  }
  std::printf("%-24s %14" PRId64 " %14.6g %12s\n", "total", total_params, total_flops, human(total_flops).c_str());
  std::printf("\nparameters: %s; a training step costs about 3x the forward FLOPs\n", human(double(total_params)).c_str());
}

}  // namespace

void add_model_commands(CLI::App& app) {
  CLI::App* model = app.add_subcommand("model", "Inspect the multimodal model an experiment describes");
  model->require_subcommand(1);
  auto options = std::make_shared<SummaryOptions>();
  CLI::App* summary = model->add_subcommand(
      "summary", "Parameters and forward FLOPs per component (encoders, stacks, fusion, heads) for one sample");
  summary->add_option("config", options->config, "Experiment file (TOML)")->required();
  summary->add_option("--set", options->sets, "Override a key, e.g. --set fusion.strategy=late (repeatable)");
  summary->add_option("--length", options->lengths,
                      "Tokens per sample: N for every modality or modality=N (repeatable; default " +
                          std::to_string(kDefaultLength) + ")");
  summary->callback([options] { run_summary(*options); });
}

}  // namespace longnet::app
