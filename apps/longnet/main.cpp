// The `longnet` command: one entry point for every job of the toolkit.
//
// Exit status: 0 success, 1 runtime failure (data, I/O, device), 2 configuration or usage error.
#include <algorithm>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include "apps/longnet/commands.h"
#include "core/error.h"
#include "core/log.h"
#include "distributed/launch.h"
#include "distributed/process_group.h"
#include "pipelines/experiment_config.h"
#include "pipelines/run.h"
#ifdef LONGNET_WITH_BENCH
#include "bench/bench_attention.h"
#endif

namespace {

using namespace longnet;

constexpr int kExitRuntime = 1;
constexpr int kExitConfig = 2;

std::string version_text() {
  std::string s = "longnet " LONGNET_VERSION "\n";
  s += "torch " + std::string(TORCH_VERSION) + "\n";
  if (torch::cuda::is_available()) {
    s += "CUDA: available, " + std::to_string(torch::cuda::device_count()) + " device(s)\n";
  } else {
    s += std::string("CUDA: ") + (at::hasCUDA() ? "built into torch, no device visible" : "not in this torch") + "\n";
  }
  s += std::string("cuDNN: ") + (torch::cuda::cudnn_is_available() ? "available" : "not available") + "\n";
#ifdef LONGNET_WITH_CUDA
  s += "features: cuda-kernels=on";
#else
  s += "features: cuda-kernels=off";
#endif
#ifdef LONGNET_WITH_MEDIA
  s += " media=on\n";
#else
  s += " media=off\n";
#endif
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"longnet: multimodal LongNet research toolkit (dilated attention, fusion, training, evaluation)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", [] { return version_text(); }, "Print versions and compiled features, then exit");
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")->capture_default_str();

  // longnet run CONFIG [--set key=value]...  |  longnet run --resume RUN_DIR [--set key=value]...
  CLI::App* run = app.add_subcommand("run", "Run an experiment described by a TOML file");
  std::string run_config, run_resume;
  std::vector<std::string> run_sets;
  run->add_option("config", run_config, "Experiment file (TOML)");
  run->add_option("--resume", run_resume,
                  "Continue the run in this folder from its newest checkpoint, with its config.toml (overrides "
                  "with --set, e.g. more train.steps)");
  run->add_option("--set", run_sets, "Override a key, e.g. --set train.steps=50 (repeatable)");
  int run_nproc = 0;
  run->add_option("--nproc", run_nproc,
                  "Ranks to spawn on this host (data parallel; one per GPU with CUDA); without it, RANK/WORLD_SIZE/"
                  "MASTER_ADDR/MASTER_PORT from a launcher are honoured");

  // longnet config check|print CONFIG [--set key=value]...
  CLI::App* cfg = app.add_subcommand("config", "Validate or print experiment files");
  cfg->require_subcommand(1);
  std::string cfg_file;
  std::vector<std::string> cfg_sets;
  CLI::App* check = cfg->add_subcommand("check", "Validate a config; exit 2 with the first error");
  CLI::App* print = cfg->add_subcommand("print", "Print the fully resolved config (base and overrides applied)");
  for (CLI::App* sub : {check, print}) {
    sub->add_option("config", cfg_file, "Experiment file (TOML)")->required();
    sub->add_option("--set", cfg_sets, "Override a key (repeatable)");
  }

  // ---- bench: `longnet bench attention [options]` (bench/bench_attention.h) ----------------------------------
#ifdef LONGNET_WITH_BENCH
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (need a CUDA device)");
  bench->require_subcommand(1);
  CLI::App* bench_attention = bench->add_subcommand(
      "attention", "Dilated attention: flash backend vs dense SDPA and a torch-composed implementation");
  bench::AttentionBenchOptions bench_opts;
  bench::add_attention_bench_options(*bench_attention, bench_opts);
#endif
  // ---- end bench ------------------------------------------------------------------------------------------------

  // Areas that register their own subcommands (apps/longnet/commands.h); their callbacks run inside app.parse().
#ifdef LONGNET_WITH_MEDIA
  app::add_tokenizer_commands(app);
#endif
  app::add_model_commands(app);
  app::add_data_commands(app);
  app::add_preset_commands(app);
  // The log level must be set before any callback runs.
  app.parse_complete_callback([&] { log::set_level(log::parse_level(log_level)); });

  try {
    try {
      app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
      return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
      return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
      return app.exit(e);
    } catch (const CLI::ParseError& e) {
      app.exit(e);
      return kExitConfig;
    }

    if (*run) {
      if (run_config.empty() == run_resume.empty()) {
        throw ConfigError("run: give an experiment file, or --resume RUN_DIR (not both)");
      }
      const std::string config_file =
          run_resume.empty() ? run_config : (std::filesystem::path(run_resume) / "config.toml").string();
      if (!run_resume.empty() && !std::filesystem::exists(config_file)) {
        throw ConfigError("run --resume: '" + run_resume + "' is not a run folder (no config.toml)");
      }
      const auto experiment = pipelines::load_experiment(config_file, run_sets);
      if (!distributed::launch_env_from_environment()) pipelines::check_ranks(experiment, std::max(run_nproc, 1));
      if (run_nproc > 1 && !distributed::launch_env_from_environment()) {  // config errors surface before spawning
        distributed::SpawnOptions spawn;
        spawn.nproc = run_nproc;
        spawn.drop_arguments = {"--nproc"};
        return distributed::spawn_local_ranks(spawn, argc, argv);
      }
      pipelines::run_experiment(experiment, {.resume = run_resume});
    } else if (*check) {
      const auto experiment = pipelines::load_experiment(cfg_file, cfg_sets);
      for (const auto& w : experiment.attention.dilated.coverage_warnings(experiment.model.heads)) {
        log::warn("attention: " + w);
      }
      std::cout << cfg_file << ": ok\n";
    } else if (*print) {
      std::cout << pipelines::to_toml(pipelines::load_experiment(cfg_file, cfg_sets));
#ifdef LONGNET_WITH_BENCH
    } else if (*bench_attention) {
      return bench::run_attention_benchmark(bench_opts);
#endif
    }
  } catch (const ConfigError& e) {
    std::cerr << "error: " << format_error_chain(e) << "\n";
    return kExitConfig;
  } catch (const std::exception& e) {
    std::cerr << "error: " << format_error_chain(e) << "\n";
    return kExitRuntime;
  }
  return 0;
}
