#include "core/tensorboard.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "core/error.h"

namespace longnet {
namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli polynomial
    table[i] = c;
  }
  return table;
}
constexpr auto kCrc32cTable = make_crc32c_table();

// TFRecord stores CRCs masked, so that a CRC of data that itself holds CRCs stays well distributed.
uint32_t masked_crc(std::string_view bytes) {
  const uint32_t crc = crc32c(bytes);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

// ---- the protocol buffer wire format, for the fields used here ------------------------------------------------
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, uint32_t field, uint32_t wire_type) { put_varint(out, (field << 3) | wire_type); }
template <typename T>
void put_fixed(std::string& out, T value) {  // little-endian, as the wire format and x86 agree
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}
void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}

double wall_time() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event { double wall_time = 1; int64 step = 2; oneof { string file_version = 3; Summary summary = 5; } }
std::string event(int64_t step, uint32_t field, std::string_view payload) {
  std::string e;
  put_tag(e, 1, 1);
  put_fixed(e, wall_time());
  put_tag(e, 2, 0);
  put_varint(e, static_cast<uint64_t>(step));
  put_bytes(e, field, payload);
  return e;
}

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

}  // namespace

uint32_t crc32c(std::string_view bytes) {
  uint32_t c = 0xffffffffu;
  for (const char ch : bytes) c = kCrc32cTable[(c ^ static_cast<uint8_t>(ch)) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

TensorBoardWriter::TensorBoardWriter(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw IoError("cannot create TensorBoard folder '" + dir.string() + "': " + ec.message());
  const auto seconds = static_cast<int64_t>(wall_time());
  // The pid keeps two writers started in the same second apart.
  path_ = dir / ("events.out.tfevents." + std::to_string(seconds) + "." + host_name() + "." +
                 std::to_string(::getpid()));
  file_ = std::fopen(path_.c_str(), "wb");
  if (file_ == nullptr) throw IoError("cannot create '" + path_.string() + "': " + std::strerror(errno));
  write_record(event(0, 3, "brain.Event:2"));
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

void TensorBoardWriter::add_scalar(std::string_view tag, double value, int64_t step) {
  // Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
  std::string v;
  put_bytes(v, 1, tag);
  put_tag(v, 2, 5);
  put_fixed(v, static_cast<float>(value));
  std::string summary;
  put_bytes(summary, 1, v);
  write_record(event(step, 5, summary));
}

void TensorBoardWriter::add_session_start(int64_t step) {
  // SessionLog { SessionStatus status = 1; }, START = 1: TensorBoard drops earlier events at steps >= `step`.
  std::string log;
  put_tag(log, 1, 0);
  put_varint(log, 1);
  write_record(event(step, 6, log));
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::string header;
  put_fixed(header, static_cast<uint64_t>(data.size()));
  std::string record = header;
  put_fixed(record, masked_crc(header));
  record += data;
  put_fixed(record, masked_crc(data));
  if (std::fwrite(record.data(), 1, record.size(), file_) != record.size()) {
    throw IoError("cannot write '" + path_.string() + "': " + std::strerror(errno));
  }
}

void TensorBoardWriter::flush() {
  if (std::fflush(file_) != 0) throw IoError("cannot write '" + path_.string() + "': " + std::strerror(errno));
}

}  // namespace longnet
