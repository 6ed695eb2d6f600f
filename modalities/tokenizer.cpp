#include "modalities/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include "core/atomic_file.h"
#include "core/error.h"

namespace longnet::text {

namespace fs = std::filesystem;

namespace {

std::string join_paths(const std::vector<fs::path>& paths) {
  std::string s;
  for (const auto& p : paths) s += (s.empty() ? "" : ", ") + p.string();
  return s;
}

// Feeds SentencePiece the non-empty lines of files, read one at a time (corpora need not fit in memory twice).
class FileLines : public sentencepiece::SentenceIterator {
 public:
  explicit FileLines(const std::vector<fs::path>& files) : files_(files) { Next(); }
  bool done() const override { return done_; }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return status_; }
  void Next() override {
    while (!done_) {
      if (!in_.is_open()) {
        if (next_file_ == files_.size()) {
          done_ = true;
          return;
        }
        in_.open(files_[next_file_], std::ios::binary);
        if (!in_) {
          status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kNotFound,
                                                files_[next_file_].string() + ": cannot be read");
          done_ = true;
          return;
        }
        ++next_file_;
      }
      if (std::getline(in_, line_)) {
        if (!line_.empty() && line_.back() == '\r') line_.pop_back();
        if (!line_.empty()) return;
      } else {
        in_.close();
        in_.clear();
      }
    }
  }

 private:
  const std::vector<fs::path>& files_;
  size_t next_file_ = 0;
  std::ifstream in_;
  std::string line_;
  bool done_ = false;
  sentencepiece::util::Status status_;
};

class VectorLines : public sentencepiece::SentenceIterator {
 public:
  explicit VectorLines(const std::vector<std::string>& lines) : lines_(lines) { skip_empty(); }
  bool done() const override { return i_ >= lines_.size(); }
  const std::string& value() const override { return lines_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }
  void Next() override {
    ++i_;
    skip_empty();
  }

 private:
  void skip_empty() {
    while (i_ < lines_.size() && lines_[i_].empty()) ++i_;
  }
  const std::vector<std::string>& lines_;
  size_t i_ = 0;
};

void check_options(const TrainOptions& o, const std::string& source) {
  const std::vector<std::string> types = {"unigram", "bpe", "char", "word"};
  if (std::find(types.begin(), types.end(), o.model_type) == types.end()) {
    throw ConfigError(source + ": model type '" + o.model_type + "' is not one of unigram, bpe, char, word");
  }
  // <unk>, <s>, </s>, <pad>, the user-defined pieces, and at least one learned piece.
  const auto reserved = 4 + static_cast<int64_t>(o.special_tokens.size());
  if (o.vocab_size <= reserved) {
    throw ConfigError(source + ": vocab size " + std::to_string(o.vocab_size) + " leaves no room for learned pieces (" +
                      std::to_string(reserved) + " ids are reserved for <unk>, <s>, </s>, <pad> and the special tokens)");
  }
  if (!(o.character_coverage > 0.0 && o.character_coverage <= 1.0)) {
    throw ConfigError(source + ": character coverage must be in (0, 1], got " + std::to_string(o.character_coverage));
  }
  if (o.threads < 1) throw ConfigError(source + ": thread count must be at least 1");
  // SentencePiece refuses samples of 100 sentences or fewer.
  if (o.max_sentences < 0 || (o.max_sentences > 0 && o.max_sentences <= 100)) {
    throw ConfigError(source + ": max sentences must be 0 (all) or more than 100, got " +
                      std::to_string(o.max_sentences));
  }
  for (const auto& t : o.special_tokens) {
    if (t.empty() || t.find_first_of(" \t\n,") != std::string::npos) {
      throw ConfigError(source + ": special token '" + t + "' must be non-empty without spaces or commas");
    }
    if (t == "<unk>" || t == "<s>" || t == "</s>" || t == "<pad>") {
      throw ConfigError(source + ": special token '" + t + "' is always present; list only extra tokens");
    }
    if (std::count(o.special_tokens.begin(), o.special_tokens.end(), t) > 1) {
      throw ConfigError(source + ": special token '" + t + "' is listed twice");
    }
  }
}

void train_impl(sentencepiece::SentenceIterator& lines, const std::string& source, const fs::path& prefix,
                const TrainOptions& o) {
  check_options(o, source);
  if (prefix.filename().empty()) throw ConfigError(source + ": output prefix '" + prefix.string() + "' names no file");

  std::string specials;
  for (const auto& t : o.special_tokens) specials += (specials.empty() ? "" : ",") + t;
  std::unordered_map<std::string, std::string> args = {
      {"model_type", o.model_type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"character_coverage", std::to_string(o.character_coverage)},
      {"num_threads", std::to_string(o.threads)},
      {"max_sentence_length", std::to_string(o.max_sentence_length)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "3"},
      {"hard_vocab_limit", "true"},
      {"minloglevel", "2"},  // SentencePiece logs every training step to stderr otherwise
  };
  if (!specials.empty()) args["user_defined_symbols"] = specials;
  if (o.max_sentences > 0) {
    args["input_sentence_size"] = std::to_string(o.max_sentences);
    args["shuffle_input_sentence"] = "true";
  }
  sentencepiece::SetRandomGeneratorSeed(o.seed);

  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  if (!status.ok()) {
    throw DataError(source + ": cannot train a " + o.model_type + " tokenizer of " + std::to_string(o.vocab_size) +
                    " pieces: " + status.message());
  }
  sentencepiece::SentencePieceProcessor sp;
  if (const auto s = sp.LoadFromSerializedProto(model); !s.ok()) {
    throw DataError(source + ": the trained tokenizer does not load: " + s.message());
  }

  // The .vocab file in SentencePiece's own layout: piece TAB score, one line per id.
  std::ostringstream vocab;
  for (int id = 0; id < sp.GetPieceSize(); ++id) vocab << sp.IdToPiece(id) << '\t' << sp.GetScore(id) << '\n';

  if (!prefix.parent_path().empty()) {
    std::error_code ec;
    fs::create_directories(prefix.parent_path(), ec);
    if (ec) throw IoError(prefix.parent_path().string() + ": cannot create the folder: " + ec.message());
  }
  // The .model last: its presence means the pair is complete.
  write_file_atomic(fs::path(prefix.string() + ".vocab"), vocab.str());
  write_file_atomic(fs::path(prefix.string() + ".model"), model);
}

}  // namespace

void Tokenizer::train(const std::vector<fs::path>& inputs, const fs::path& prefix, const TrainOptions& options) {
  if (inputs.empty()) throw ConfigError("tokenizer training: no input files given");
  for (const auto& f : inputs) {
    std::error_code ec;
    if (!fs::is_regular_file(f, ec)) throw ConfigError(f.string() + ": tokenizer training input does not exist");
  }
  FileLines lines(inputs);
  train_impl(lines, join_paths(inputs), prefix, options);
}

void Tokenizer::train(const std::vector<std::string>& sentences, const std::string& source, const fs::path& prefix,
                      const TrainOptions& options) {
  VectorLines lines(sentences);
  if (lines.done()) throw DataError(source + ": no text to train a tokenizer on");
  train_impl(lines, source, prefix, options);
}

Tokenizer Tokenizer::load(const fs::path& model) {
  std::error_code ec;
  if (!fs::is_regular_file(model, ec)) throw ConfigError(model.string() + ": tokenizer model does not exist");
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  if (const auto s = sp->Load(model.string()); !s.ok()) {
    throw DataError(model.string() + ": not a SentencePiece model: " + s.message());
  }
  return Tokenizer(std::move(sp), model);
}

Tokenizer::Tokenizer(std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp, fs::path file)
    : sp_(std::move(sp)), file_(std::move(file)) {}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool add_eos) const {
  std::vector<int> ids;
  if (const auto s = sp_->Encode(text, &ids); !s.ok()) {
    throw DataError(file_.string() + ": cannot encode text: " + s.message());
  }
  std::vector<int32_t> out;
  out.reserve(ids.size() + 2);
  if (add_bos && bos_id() >= 0) out.push_back(bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  if (add_eos && eos_id() >= 0) out.push_back(eos_id());
  return out;
}

std::vector<std::string> Tokenizer::encode_pieces(std::string_view text) const {
  std::vector<std::string> pieces;
  if (const auto s = sp_->Encode(text, &pieces); !s.ok()) {
    throw DataError(file_.string() + ": cannot encode text: " + s.message());
  }
  return pieces;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  for (const auto id : ids) check_id(id);
  const std::vector<int> in(ids.begin(), ids.end());
  std::string text;
  if (const auto s = sp_->Decode(in, &text); !s.ok()) {
    throw DataError(file_.string() + ": cannot decode ids: " + s.message());
  }
  return text;
}

int32_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int32_t Tokenizer::piece_to_id(std::string_view piece) const { return sp_->PieceToId(piece); }

std::string Tokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return sp_->IdToPiece(id);
}

int32_t Tokenizer::special_id(std::string_view piece) const {
  const int id = sp_->PieceToId(piece);
  // PieceToId answers unk for unknown pieces; only "<unk>" itself may legitimately map there.
  if (id == sp_->unk_id() && piece != sp_->IdToPiece(id)) {
    throw ConfigError(file_.string() + ": the tokenizer has no piece '" + std::string(piece) + "'");
  }
  return id;
}

int32_t Tokenizer::unk_id() const { return sp_->unk_id(); }
int32_t Tokenizer::bos_id() const { return sp_->bos_id(); }
int32_t Tokenizer::eos_id() const { return sp_->eos_id(); }
int32_t Tokenizer::pad_id() const { return sp_->pad_id(); }

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= sp_->GetPieceSize()) {
    throw DataError(file_.string() + ": id " + std::to_string(id) + " is outside the vocabulary [0, " +
                    std::to_string(sp_->GetPieceSize()) + ")");
  }
}

}  // namespace longnet::text
