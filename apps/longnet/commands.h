// Subcommands of `longnet`, one registration function per area, each in its own commands_<area>.cpp.
//
// A registration adds subcommands whose CLI11 callbacks do the work. Callbacks throw the toolkit's errors
// (core/error.h); main() turns them into one line on stderr and the exit status: 2 for ConfigError (bad config,
// bad arguments), 1 for anything else. Option values live in objects the callbacks own (std::shared_ptr captures),
// because the CLI::App outlives the registration function.
#pragma once

namespace CLI {
class App;
}

namespace longnet::app {

// One line per area; main.cpp calls each (and only those compiled in).
void add_tokenizer_commands(CLI::App& app);  // commands_tokenizer.cpp (media build)
void add_model_commands(CLI::App& app);  // commands_model.cpp
void add_data_commands(CLI::App& app);
void add_preset_commands(CLI::App& app);  // commands_presets.cpp: ls, cp  // commands_data.cpp: embed, ablate, and prepare in the media build

}  // namespace longnet::app
