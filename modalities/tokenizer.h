// The SentencePiece tokenizer of the text modality: training a model from text, loading it, and turning text into
// int32 ids and back.
//
//   text::TrainOptions opts;
//   opts.vocab_size = 4000;                     // special tokens and modality separators included
//   text::Tokenizer::train({"corpus.txt"}, "out/spm", opts);  // writes out/spm.model and out/spm.vocab
//   const auto tok = text::Tokenizer::load("out/spm.model");
//   std::vector<int32_t> ids = tok.encode("<video> two red squares moving left", /*add_bos=*/true);
//   std::string back = tok.decode(ids);         // "<video> two red squares moving left"
//   int32_t video = tok.special_id("<video>");
//
// Ids: <unk> 0, <s> (BOS) 1, </s> (EOS) 2, <pad> 3, then the user-defined pieces (modality separators) in the
// order given, then the learned pieces. BOS, EOS and PAD are control pieces: they never come out of encode() for
// any text and decode() drops them. User-defined pieces are always one token wherever they occur in the text.
//
// Errors: ConfigError for bad options or a named file that is missing; DataError when the text cannot give the
// requested vocabulary, a model file is not a SentencePiece model, or an id is out of range. Messages name the file.
// Training sets process-wide SentencePiece state (random seed, log level): do not train on two threads at once.
// A loaded Tokenizer is safe to use from several threads.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace longnet::text {

struct TrainOptions {
  int32_t vocab_size = 8000;
  std::string model_type = "unigram";  // unigram, bpe, char or word
  // Fraction of the characters the vocabulary must cover; the rarest rest become <unk>. 1.0 keeps every character
  // (right for small alphabets), 0.9995 is usual for text with a large character set.
  double character_coverage = 1.0;
  // User-defined pieces, each always a single token (the modality separators by default).
  std::vector<std::string> special_tokens = {"<video>", "<audio>", "<image>", "<text>"};
  uint32_t seed = 0;
  int32_t threads = 1;
  // Sentences (lines) sampled for training: 0 for all of them, else more than 100; sampling uses `seed`.
  int64_t max_sentences = 0;
  // Longer lines are skipped by SentencePiece; in bytes.
  int32_t max_sentence_length = 16384;
};

class Tokenizer {
 public:
  // Trains on the lines of `inputs` (UTF-8 text files) and writes `<prefix>.model` and `<prefix>.vocab`, each
  // atomically (the folder is created if needed). Empty lines are skipped.
  static void train(const std::vector<std::filesystem::path>& inputs, const std::filesystem::path& prefix,
                    const TrainOptions& options);
  // The same from sentences in memory (e.g. a manifest's captions); `source` names them in error messages.
  static void train(const std::vector<std::string>& sentences, const std::string& source,
                    const std::filesystem::path& prefix, const TrainOptions& options);

  static Tokenizer load(const std::filesystem::path& model);

  std::vector<int32_t> encode(std::string_view text, bool add_bos = false, bool add_eos = false) const;
  std::vector<std::string> encode_pieces(std::string_view text) const;
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t vocab_size() const;
  // The id of `piece`, or unk_id() when the vocabulary lacks it.
  int32_t piece_to_id(std::string_view piece) const;
  std::string id_to_piece(int32_t id) const;
  // The id of a piece that must be in the vocabulary (a modality separator, say); ConfigError naming the model
  // file otherwise.
  int32_t special_id(std::string_view piece) const;

  int32_t unk_id() const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;

  const std::filesystem::path& file() const { return file_; }

 private:
  Tokenizer(std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp, std::filesystem::path file);
  void check_id(int32_t id) const;

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::filesystem::path file_;
};

}  // namespace longnet::text
