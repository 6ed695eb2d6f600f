#include "pipelines/shards.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/atomic_file.h"
#include "core/error.h"

namespace longnet::pipelines {

namespace fs = std::filesystem;
using nlohmann::json;

static_assert(std::endian::native == std::endian::little, "shards store little-endian bytes as they are in memory");

namespace {

constexpr const char* kIndex = "index.json";
constexpr const char* kPartialIndex = "index.partial.json";
constexpr const char* kFormat = "longnet-shards";
constexpr int kVersion = 1;
// A header larger than this is taken for corruption rather than allocated.
constexpr uint64_t kMaxHeaderBytes = uint64_t{1} << 30;

struct DtypeInfo {
  at::ScalarType type;
  const char* name;
  int64_t size;
};
const DtypeInfo kDtypes[] = {
    {at::kBool, "BOOL", 1}, {at::kByte, "U8", 1},      {at::kChar, "I8", 1},       {at::kShort, "I16", 2},
    {at::kInt, "I32", 4},   {at::kLong, "I64", 8},     {at::kHalf, "F16", 2},      {at::kBFloat16, "BF16", 2},
    {at::kFloat, "F32", 4}, {at::kDouble, "F64", 8},
};

const DtypeInfo* dtype_by_name(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DtypeInfo& dtype_of(at::ScalarType type, const std::string& what) {
  for (const auto& d : kDtypes) {
    if (type == d.type) return d;
  }
  throw ConfigError(what + ": dtype " + std::string(c10::toString(type)) +
                    " cannot be stored (bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32, float64)");
}

std::string hex32(uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

uint32_t crc32_update(uint32_t crc, const char* data, size_t n) {
  uLong c = crc;
  while (n > 0) {
    const uInt chunk = static_cast<uInt>(std::min<size_t>(n, size_t{1} << 30));
    c = ::crc32(c, reinterpret_cast<const Bytef*>(data), chunk);
    data += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(c);
}

json field_json(const ShardField& f) { return {{"dtype", f.dtype}, {"shape", f.shape}, {"bytes", f.bytes}}; }

std::string read_small_file(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw DataError(file.string() + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Reads exactly n bytes at `offset`; false on a short read (a truncated file).
bool pread_all(int fd, void* dst, size_t n, int64_t offset) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, n, offset);
    if (got < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (got == 0) return false;
    p += got;
    n -= static_cast<size_t>(got);
    offset += got;
  }
  return true;
}

// The index of a shard folder, checked for shape: DataError naming the file on any mismatch.
struct IndexShard {
  std::string file;
  int64_t bytes = 0;
  uint32_t crc32 = 0;
  int64_t first_sample = 0;
  std::vector<std::pair<std::string, std::vector<ShardField>>> samples;
};

std::vector<IndexShard> parse_index(const fs::path& file) {
  const std::string where = file.string() + ": ";
  json j;
  try {
    j = json::parse(read_small_file(file));
  } catch (const json::parse_error& e) {
    throw DataError(where + "not valid JSON (" + e.what() + ")");
  }
  std::vector<IndexShard> out;
  try {
    if (j.at("format") != kFormat) throw DataError(where + "not a " + std::string(kFormat) + " index");
    if (j.at("version") != kVersion) {
      throw DataError(where + "index version " + j.at("version").dump() + ", this build reads " +
                      std::to_string(kVersion));
    }
    int64_t expected_first = 0;
    for (const auto& s : j.at("shards")) {
      IndexShard shard;
      shard.file = s.at("file").get<std::string>();
      if (shard.file.empty() || shard.file.find('/') != std::string::npos) {
        throw DataError(where + "shard file name '" + shard.file + "' must be a plain file name");
      }
      shard.bytes = s.at("bytes").get<int64_t>();
      shard.crc32 = static_cast<uint32_t>(std::stoul(s.at("crc32").get<std::string>(), nullptr, 16));
      shard.first_sample = s.at("first_sample").get<int64_t>();
      if (shard.first_sample != expected_first) {
        throw DataError(where + "shard " + shard.file + " starts at sample " + std::to_string(shard.first_sample) +
                        ", expected " + std::to_string(expected_first));
      }
      for (const auto& sample : s.at("samples")) {
        std::vector<ShardField> fields;
        for (const auto& [name, f] : sample.at("fields").items()) {
          fields.push_back({name, f.at("dtype").get<std::string>(), f.at("shape").get<std::vector<int64_t>>(),
                            f.at("bytes").get<int64_t>()});
        }
        shard.samples.emplace_back(sample.at("id").get<std::string>(), std::move(fields));
      }
      expected_first += static_cast<int64_t>(shard.samples.size());
      out.push_back(std::move(shard));
    }
  } catch (const json::exception& e) {
    throw DataError(where + "malformed index (" + e.what() + ")");
  } catch (const std::logic_error& e) {  // std::stoul on a bad checksum
    throw DataError(where + "malformed index (" + e.what() + ")");
  }
  return out;
}

}  // namespace

uint32_t file_crc32(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(file.string() + ": cannot open: " + std::strerror(errno));
  std::vector<char> buf(size_t{1} << 20);
  uint32_t crc = static_cast<uint32_t>(::crc32(0L, Z_NULL, 0));
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw IoError(file.string() + ": cannot read: " + std::strerror(err));
    }
    if (n == 0) break;
    crc = crc32_update(crc, buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return crc;
}

// ---- writer --------------------------------------------------------------------------------------------------------

ShardWriter::ShardWriter(fs::path dir, ShardWriterOptions options) : dir_(std::move(dir)), options_(std::move(options)) {
  if (options_.max_shard_bytes <= 0) throw ConfigError(dir_.string() + ": the shard size limit must be positive");
  if (options_.file_prefix.empty() || options_.file_prefix.find('/') != std::string::npos) {
    throw ConfigError(dir_.string() + ": shard file prefix '" + options_.file_prefix + "' must be a plain name");
  }
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) throw IoError(dir_.string() + ": cannot create the folder: " + ec.message());
  resume();
}

std::string ShardWriter::shard_name(size_t number) const {
  char buf[32];
  std::snprintf(buf, sizeof buf, "-%05zu.safetensors", number);
  return options_.file_prefix + buf;
}

void ShardWriter::resume() {
  // The partial index is newer than index.json whenever both exist: finish() removes it.
  fs::path index = dir_ / kPartialIndex;
  if (!fs::exists(index)) index = dir_ / kIndex;
  if (fs::exists(index)) {
    for (auto& shard : parse_index(index)) {
      // Keep the valid prefix only, so that sample indices stay contiguous.
      const fs::path path = dir_ / shard.file;
      std::error_code ec;
      const auto size = fs::file_size(path, ec);
      if (ec || static_cast<int64_t>(size) != shard.bytes || file_crc32(path) != shard.crc32) break;
      ClosedShard kept{shard.file, shard.bytes, shard.crc32, shard.first_sample, {}};
      for (auto& [id, fields] : shard.samples) {
        ids_.insert(id);
        kept.samples.push_back({id, std::move(fields)});
      }
      next_sample_ += static_cast<int64_t>(kept.samples.size());
      closed_.push_back(std::move(kept));
    }
  }
  kept_samples_ = next_sample_;
  open_first_sample_ = next_sample_;

  // Temporary leftovers of an interrupted write, and shards that are not (or no longer) listed.
  std::unordered_set<std::string> kept_files;
  for (const auto& s : closed_) kept_files.insert(s.file);
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(dir_)) {
    const std::string name = e.path().filename().string();
    const bool temp = name.find(".tmp.") != std::string::npos;
    const bool shard = name.starts_with(options_.file_prefix + "-") && name.ends_with(".safetensors");
    if (temp || (shard && !kept_files.contains(name))) stale.push_back(e.path());
  }
  for (const auto& p : stale) {
    std::error_code ec;
    fs::remove(p, ec);
    if (ec) throw IoError(p.string() + ": cannot remove a stale file: " + ec.message());
  }
}

bool ShardWriter::contains(std::string_view id) const { return ids_.contains(std::string(id)); }

void ShardWriter::add(const std::string& id, const SampleTensors& fields) {
  const std::string where = dir_.string() + ": sample '" + id + "'";
  if (finished_) throw ConfigError(where + ": the writer is finished");
  if (id.empty()) throw ConfigError(dir_.string() + ": a sample id must not be empty");
  if (ids_.contains(id)) throw ConfigError(where + " is already stored");
  if (fields.empty()) throw ConfigError(where + " has no fields");

  std::vector<at::Tensor> tensors;
  std::vector<ShardField> described;
  int64_t bytes = 0;
  for (const auto& [name, tensor] : fields) {
    if (name.empty() || name.find('.') != std::string::npos) {
      throw ConfigError(where + ": field name '" + name + "' must be non-empty without '.'");
    }
    for (const auto& d : described) {
      if (d.name == name) throw ConfigError(where + ": field '" + name + "' is given twice");
    }
    if (!tensor.defined()) throw ConfigError(where + ": field '" + name + "' is an undefined tensor");
    const DtypeInfo dtype = dtype_of(tensor.scalar_type(), where + ": field '" + name + "'");
    at::Tensor t = tensor.to(at::kCPU).contiguous();
    described.push_back({name, dtype.name, t.sizes().vec(), static_cast<int64_t>(t.nbytes())});
    bytes += static_cast<int64_t>(t.nbytes());
    tensors.push_back(std::move(t));
  }

  if (!open_samples_.empty() && static_cast<int64_t>(open_data_.size()) + bytes > options_.max_shard_bytes) {
    close_shard();
  }
  const std::string key = std::to_string(next_sample_) + ".";
  for (size_t i = 0; i < tensors.size(); ++i) {
    open_tensors_.emplace_back(key + described[i].name, described[i]);
    open_data_.append(static_cast<const char*>(tensors[i].data_ptr()), tensors[i].nbytes());
  }
  open_samples_.push_back({id, std::move(described)});
  ids_.insert(id);
  ++next_sample_;
  if (static_cast<int64_t>(open_data_.size()) >= options_.max_shard_bytes) close_shard();
}

void ShardWriter::close_shard() {
  if (open_samples_.empty()) return;
  json header = json::object();
  json ids = json::array();
  for (const auto& s : open_samples_) ids.push_back(s.id);
  // safetensors metadata values are strings.
  header["__metadata__"] = {{"format", kFormat},
                            {"version", std::to_string(kVersion)},
                            {"first_sample", std::to_string(open_first_sample_)},
                            {"sample_ids", ids.dump()}};
  int64_t offset = 0;
  for (const auto& [name, f] : open_tensors_) {
    header[name] = {{"dtype", f.dtype}, {"shape", f.shape}, {"data_offsets", {offset, offset + f.bytes}}};
    offset += f.bytes;
  }
  std::string header_text = header.dump();
  // Padding with spaces to 8 bytes keeps the data aligned, as the safetensors package does.
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::string file;
  file.reserve(8 + header_text.size() + open_data_.size());
  const uint64_t n = header_text.size();
  file.append(reinterpret_cast<const char*>(&n), 8);
  file += header_text;
  file += open_data_;

  const std::string name = shard_name(closed_.size());
  write_file_atomic(dir_ / name, file);
  const uint32_t crc = crc32_update(static_cast<uint32_t>(::crc32(0L, Z_NULL, 0)), file.data(), file.size());
  closed_.push_back({name, static_cast<int64_t>(file.size()), crc, open_first_sample_, std::move(open_samples_)});

  open_samples_.clear();
  open_tensors_.clear();
  open_data_.clear();
  open_data_.shrink_to_fit();
  open_first_sample_ = next_sample_;
  write_index(dir_ / kPartialIndex, false);
}

void ShardWriter::write_index(const fs::path& file, bool complete) const {
  json shards = json::array();
  for (const auto& s : closed_) {
    json samples = json::array();
    for (const auto& sample : s.samples) {
      json fields = json::object();
      for (const auto& f : sample.fields) fields[f.name] = field_json(f);
      samples.push_back({{"id", sample.id}, {"fields", fields}});
    }
    shards.push_back({{"file", s.file},
                      {"bytes", s.bytes},
                      {"crc32", hex32(s.crc32)},
                      {"first_sample", s.first_sample},
                      {"samples", samples}});
  }
  // nlohmann's json keeps object keys sorted, so the file is the same for the same samples.
  const json index = {{"format", kFormat},      {"version", kVersion},  {"complete", complete},
                      {"checksum", "crc32"},    {"samples", next_sample_}, {"shards", shards}};
  write_file_atomic(file, index.dump(1) + "\n");
}

void ShardWriter::finish() {
  if (finished_) return;
  close_shard();
  write_index(dir_ / kIndex, true);
  std::error_code ec;
  fs::remove(dir_ / kPartialIndex, ec);
  finished_ = true;
}

// ---- reader --------------------------------------------------------------------------------------------------------

ShardReader::ShardReader(fs::path dir, ShardReaderOptions options) : dir_(std::move(dir)) {
  const fs::path index_file = dir_ / kIndex;
  if (!fs::exists(index_file)) {
    throw DataError(index_file.string() + ": missing" +
                    (fs::exists(dir_ / kPartialIndex) ? " (the shards were not finished: only " +
                                                            std::string(kPartialIndex) + " exists)"
                                                      : std::string()));
  }
  const auto index = parse_index(index_file);
  try {
    for (const auto& entry : index) {
      Shard shard{dir_ / entry.file, -1};
      const std::string where = shard.path.string() + ": ";
      shard.fd = ::open(shard.path.c_str(), O_RDONLY | O_CLOEXEC);
      if (shard.fd < 0) throw DataError(where + "cannot open the shard: " + std::strerror(errno));
      shards_.push_back(shard);

      struct stat st {};
      if (::fstat(shard.fd, &st) != 0) throw IoError(where + "cannot stat: " + std::strerror(errno));
      if (st.st_size != entry.bytes) {
        throw DataError(where + "truncated or altered: " + std::to_string(st.st_size) + " bytes, the index says " +
                        std::to_string(entry.bytes));
      }
      if (options.verify_checksums) {
        const uint32_t crc = file_crc32(shard.path);
        if (crc != entry.crc32) {
          throw DataError(where + "corrupt: CRC-32 " + hex32(crc) + ", the index says " + hex32(entry.crc32));
        }
      }

      uint64_t header_bytes = 0;
      if (entry.bytes < 8 || !pread_all(shard.fd, &header_bytes, 8, 0) || header_bytes > kMaxHeaderBytes ||
          8 + static_cast<int64_t>(header_bytes) > entry.bytes) {
        throw DataError(where + "not a safetensors file (bad header length)");
      }
      std::string header_text(header_bytes, '\0');
      if (!pread_all(shard.fd, header_text.data(), header_bytes, 8)) throw DataError(where + "truncated header");
      json header;
      try {
        header = json::parse(header_text);
      } catch (const json::parse_error& e) {
        throw DataError(where + "the safetensors header is not valid JSON (" + e.what() + ")");
      }
      const int64_t data_start = 8 + static_cast<int64_t>(header_bytes);

      for (size_t k = 0; k < entry.samples.size(); ++k) {
        const int64_t index_of_sample = entry.first_sample + static_cast<int64_t>(k);
        Sample s{entry.samples[k].first, shards_.size() - 1, entry.samples[k].second, {}};
        for (const auto& f : s.fields) {
          const std::string name = std::to_string(index_of_sample) + "." + f.name;
          const auto it = header.find(name);
          if (it == header.end()) throw DataError(where + "tensor '" + name + "' listed in the index is missing");
          const DtypeInfo* dtype = dtype_by_name(f.dtype);
          if (dtype == nullptr) throw DataError(where + "tensor '" + name + "' has unsupported dtype " + f.dtype);
          int64_t numel = 1;
          for (const auto d : f.shape) {
            if (d < 0) throw DataError(where + "tensor '" + name + "' has a negative dimension");
            numel *= d;
          }
          std::vector<int64_t> offsets;
          try {
            if (it->at("dtype") != f.dtype || it->at("shape").get<std::vector<int64_t>>() != f.shape) {
              throw DataError(where + "tensor '" + name + "' differs from the index (dtype or shape)");
            }
            offsets = it->at("data_offsets").get<std::vector<int64_t>>();
          } catch (const json::exception& e) {
            throw DataError(where + "tensor '" + name + "': malformed header entry (" + e.what() + ")");
          }
          if (offsets.size() != 2 || offsets[1] - offsets[0] != numel * dtype->size || f.bytes != numel * dtype->size ||
              offsets[0] < 0 || data_start + offsets[1] > entry.bytes) {
            throw DataError(where + "tensor '" + name + "' has data offsets outside the file or of the wrong size");
          }
          s.offsets.push_back(data_start + offsets[0]);
        }
        if (!by_id_.emplace(s.id, static_cast<int64_t>(samples_.size())).second) {
          throw DataError(index_file.string() + ": sample id '" + s.id + "' is listed twice");
        }
        samples_.push_back(std::move(s));
      }
    }
  } catch (...) {
    for (const auto& s : shards_) ::close(s.fd);
    throw;
  }
}

ShardReader::~ShardReader() {
  for (const auto& s : shards_) ::close(s.fd);
}

const ShardReader::Sample& ShardReader::sample(int64_t index) const {
  if (index < 0 || index >= size()) {
    throw ConfigError(dir_.string() + ": sample index " + std::to_string(index) + " is outside [0, " +
                      std::to_string(size()) + ")");
  }
  return samples_[static_cast<size_t>(index)];
}

const std::string& ShardReader::id(int64_t index) const { return sample(index).id; }

std::optional<int64_t> ShardReader::find(std::string_view id) const {
  const auto it = by_id_.find(std::string(id));
  if (it == by_id_.end()) return std::nullopt;
  return it->second;
}

const std::vector<ShardField>& ShardReader::fields(int64_t index) const { return sample(index).fields; }

at::Tensor ShardReader::read_field(const Sample& s, size_t k) const {
  const ShardField& f = s.fields[k];
  at::Tensor t = torch::empty(f.shape, torch::TensorOptions().dtype(dtype_by_name(f.dtype)->type));
  const Shard& shard = shards_[s.shard];
  if (!pread_all(shard.fd, t.data_ptr(), static_cast<size_t>(f.bytes), s.offsets[k])) {
    throw DataError(shard.path.string() + ": sample '" + s.id + "' field '" + f.name +
                    "' cannot be read (truncated file)");
  }
  return t;
}

std::map<std::string, at::Tensor> ShardReader::read(int64_t index) const {
  const Sample& s = sample(index);
  std::map<std::string, at::Tensor> out;
  for (size_t k = 0; k < s.fields.size(); ++k) out.emplace(s.fields[k].name, read_field(s, k));
  return out;
}

at::Tensor ShardReader::read(int64_t index, std::string_view field) const {
  const Sample& s = sample(index);
  for (size_t k = 0; k < s.fields.size(); ++k) {
    if (s.fields[k].name == field) return read_field(s, k);
  }
  throw ConfigError(dir_.string() + ": sample '" + s.id + "' has no field '" + std::string(field) + "'");
}

}  // namespace longnet::pipelines
