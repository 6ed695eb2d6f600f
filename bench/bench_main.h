// The standalone benchmarks' exit codes: run(...)'s own, 2 for a bad option or configuration (ConfigError), 1 for any
// other failure; each error is printed with its whole chain (core/error.h).
#pragma once

#include <exception>
#include <iostream>
#include <utility>

#include "core/error.h"

namespace longnet::bench {

template <typename F>
int run_reporting_errors(F&& run) {
  try {
    return std::forward<F>(run)();
  } catch (const ConfigError& e) {
    std::cerr << "error: " << format_error_chain(e) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << format_error_chain(e) << "\n";
    return 1;
  }
}

}  // namespace longnet::bench
