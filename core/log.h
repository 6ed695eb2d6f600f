// Logging facade over spdlog. It exposes plain strings only, so that translation units which include torch (which
// ships its own fmt) never see spdlog's fmt headers. Thread-safe.
#pragma once

#include <string>
#include <string_view>

namespace longnet::log {

enum class Level { trace, debug, info, warn, error, off };

// Parses "trace|debug|info|warn|error|off"; throws ConfigError naming the accepted values otherwise.
Level parse_level(std::string_view name);
void set_level(Level level);
Level level();

void trace(std::string_view message);
void debug(std::string_view message);
void info(std::string_view message);
void warn(std::string_view message);
void error(std::string_view message);

}  // namespace longnet::log
