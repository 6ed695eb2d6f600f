// Error types of the toolkit. Library code throws; only apps/ turns an error into an exit status.
//
//   ConfigError  a configuration file, key or override is wrong (exit status 2)
//   DataError    a manifest, media file or shard is wrong
//   IoError      the file system refused (missing file, full disk, permissions)
//
// Messages say what failed, where (file:line:col, dotted key, sample) and what was expected. Callers add context by
// nesting (std::throw_with_nested); `format_error_chain` prints the whole chain, outermost first.
#pragma once

#include <stdexcept>
#include <string>

namespace longnet {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ConfigError : public Error {
 public:
  using Error::Error;
};

class DataError : public Error {
 public:
  using Error::Error;
};

class IoError : public Error {
 public:
  using Error::Error;
};

// "outer: inner: innermost" for an exception and everything nested in it.
std::string format_error_chain(const std::exception& e);

}  // namespace longnet
