// Writing files so that a crash, a kill or a full disk never leaves a half-written file under the final name:
// the bytes go to "<path>.tmp.<pid>" in the same directory, are flushed and fsync'ed, then renamed over <path>, and
// the directory is fsync'ed so that the rename survives a power cut.
#pragma once

#include <filesystem>
#include <string_view>

namespace longnet {

// Throws IoError naming the path and the system's reason; on failure the temporary file is removed and any
// existing file at `path` is left untouched.
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

}  // namespace longnet
