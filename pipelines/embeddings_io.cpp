#include "pipelines/embeddings_io.h"

#include <bit>
#include <cstdint>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"

namespace longnet::pipelines {
namespace fs = std::filesystem;
using nlohmann::json;

static_assert(std::endian::native == std::endian::little, "embeddings are written little-endian as in memory");

namespace {

struct Kind {
  const char* safetensors;
  const char* npy;
};

Kind kind_of(const std::string& name, const at::Tensor& t, size_t rows) {
  if (t.device().type() != c10::kCPU || t.dim() < 1 || static_cast<size_t>(t.size(0)) != rows) {
    throw ConfigError("embeddings '" + name + "': expected a CPU tensor with " + std::to_string(rows) + " rows");
  }
  if (t.scalar_type() == at::kFloat) return {"F32", "<f4"};
  if (t.scalar_type() == at::kBool) return {"BOOL", "|b1"};
  throw ConfigError("embeddings '" + name + "': dtype must be float32 or bool");
}

std::string raw_bytes(const at::Tensor& t) {
  const auto c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.nbytes()));
}

// An .npy file, format version 1.0: magic, header length, a Python dict literal padded to 64 bytes, raw data.
std::string npy(const std::string& descr, const std::vector<int64_t>& shape, const std::string& data) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ",";
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + dims + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  const auto n = static_cast<uint16_t>(header.size());
  out.append(reinterpret_cast<const char*>(&n), 2);
  return out + header + data;
}

// UTF-8 → code points (ids are checked to be valid UTF-8 by the manifest reader; bytes that are not decode as-is).
std::u32string code_points(const std::string& s) {
  std::u32string out;
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const int extra = b >= 0xF0 ? 3 : b >= 0xE0 ? 2 : b >= 0xC0 ? 1 : 0;
    char32_t cp = extra == 0 ? b : b & (0x3F >> extra);
    if (i + static_cast<size_t>(extra) >= s.size()) {  // a truncated sequence: keep the byte
      out += b;
      ++i;
      continue;
    }
    for (int k = 1; k <= extra; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out += cp;
    i += static_cast<size_t>(extra) + 1;
  }
  return out;
}

}  // namespace

void write_embeddings_safetensors(const fs::path& file, const NamedTensors& tensors,
                                  const std::vector<std::string>& ids) {
  json header = json::object();
  header["__metadata__"] = {{"format", "longnet-embeddings"}, {"ids", json(ids).dump()}};
  std::string data;
  for (const auto& [name, t] : tensors) {
    const Kind k = kind_of(name, t, ids.size());
    const auto bytes = raw_bytes(t);
    header[name] = {{"dtype", k.safetensors},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {data.size(), data.size() + bytes.size()}}};
    data += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t n = text.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  write_file_atomic(file, out + text + data);
}

void write_embeddings_npy(const fs::path& dir, const NamedTensors& tensors, const std::vector<std::string>& ids) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError("cannot create '" + dir.string() + "': " + ec.message());
  for (const auto& [name, t] : tensors) {
    const Kind k = kind_of(name, t, ids.size());
    write_file_atomic(dir / (name + ".npy"), npy(k.npy, t.sizes().vec(), raw_bytes(t)));
  }
  std::vector<std::u32string> points;
  size_t width = 1;
  for (const auto& id : ids) {
    points.push_back(code_points(id));
    width = std::max(width, points.back().size());
  }
  std::string data(ids.size() * width * 4, '\0');
  for (size_t i = 0; i < points.size(); ++i) {
    std::memcpy(data.data() + i * width * 4, points[i].data(), points[i].size() * 4);
  }
  write_file_atomic(dir / "ids.npy", npy("<U" + std::to_string(width), {static_cast<int64_t>(ids.size())}, data));
}

}  // namespace longnet::pipelines
