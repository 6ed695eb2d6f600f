// The SentencePiece tokenizer: training writes a loadable model pair, ids round-trip through text, special tokens
// have fixed ids and stay single tokens, training is reproducible, and every error names its file.
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "modalities/tokenizer.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::test::read_text;
using longnet::test::TempDir;
using longnet::text::Tokenizer;
using longnet::text::TrainOptions;

namespace {

// Captions in the demo dataset's style: a small vocabulary, many combinations.
std::vector<std::string> captions() {
  const char* counts[] = {"one", "two", "three"};
  const char* colours[] = {"red", "green", "blue", "yellow", "white", "purple"};
  const char* shapes[] = {"square", "rectangle", "bar"};
  const char* dirs[] = {"left", "right", "up", "down"};
  std::vector<std::string> out;
  for (int c = 0; c < 3; ++c)
    for (const char* colour : colours)
      for (const char* shape : shapes)
        for (const char* dir : dirs) {
          std::string s = std::string(counts[c]) + " " + colour + " " + shape + (c > 0 ? "s" : "") + " moving " + dir;
          out.push_back(s);
          out.push_back("a video of " + s + " on a dark background");
        }
  return out;
}

std::string corpus_text() {
  std::string text;
  for (const auto& s : captions()) text += s + "\n";
  return text;
}

TrainOptions small_options(int vocab = 60) {
  TrainOptions o;
  o.vocab_size = vocab;
  return o;
}

bool message_has(const std::exception& e, const std::string& what) {
  return std::string(e.what()).find(what) != std::string::npos;
}

}  // namespace

TEST_CASE("a trained tokenizer round-trips text and keeps fixed special ids", "[text][cpu]") {
  const TempDir dir;
  const auto corpus = dir.write("corpus.txt", corpus_text());
  Tokenizer::train({corpus}, dir.path() / "models" / "spm", small_options());

  CHECK(fs::exists(dir.path() / "models" / "spm.model"));
  // One line per piece in the .vocab file.
  const std::string vocab = read_text(dir.path() / "models" / "spm.vocab");
  CHECK(std::count(vocab.begin(), vocab.end(), '\n') == 60);
  // Nothing but the pair is left in the folder (the temporary files were renamed).
  int files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path() / "models")) ++files;
  CHECK(files == 2);

  const auto tok = Tokenizer::load(dir.path() / "models" / "spm.model");
  CHECK(tok.vocab_size() == 60);
  CHECK(tok.unk_id() == 0);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.pad_id() == 3);
  CHECK(tok.special_id("<video>") == 4);
  CHECK(tok.special_id("<audio>") == 5);
  CHECK(tok.special_id("<image>") == 6);
  CHECK(tok.special_id("<text>") == 7);
  CHECK(tok.id_to_piece(4) == "<video>");
  CHECK(tok.piece_to_id("<pad>") == 3);
  CHECK(tok.piece_to_id("no-such-piece") == tok.unk_id());

  const std::string text = "<video> two blue squares moving up <text> a video of one red bar moving left";
  const auto ids = tok.encode(text);
  REQUIRE(!ids.empty());
  // Each separator is one token, not split into characters.
  CHECK(std::count(ids.begin(), ids.end(), 4) == 1);
  CHECK(std::count(ids.begin(), ids.end(), 7) == 1);
  CHECK(std::find(ids.begin(), ids.end(), tok.unk_id()) == ids.end());
  CHECK(tok.decode(ids) == text);
  // Frequent character sequences become single pieces: fewer ids than characters.
  CHECK(ids.size() < text.size());

  const auto framed = tok.encode("one red bar", true, true);
  CHECK(framed.front() == 1);
  CHECK(framed.back() == 2);
  CHECK(tok.decode(framed) == "one red bar");  // control pieces vanish in decoding

  const auto pieces = tok.encode_pieces("<audio> moving");
  CHECK(std::count(pieces.begin(), pieces.end(), "<audio>") == 1);
}

TEST_CASE("every model type trains and round-trips", "[text][cpu]") {
  const TempDir dir;
  const auto corpus = dir.write("corpus.txt", corpus_text());
  const std::string text = "three purple rectangles moving down";
  for (const std::string type : {"bpe", "char", "word"}) {
    CAPTURE(type);
    auto o = small_options(type == "bpe" ? 60 : 30);
    o.model_type = type;
    Tokenizer::train({corpus}, dir.path() / type, o);
    const auto tok = Tokenizer::load(dir.path() / (type + ".model"));
    const auto ids = tok.encode(text);
    CHECK(tok.decode(ids) == text);
    if (type == "char") CHECK(ids.size() == text.size() + 1);  // one id per character, plus the leading "▁"
    if (type == "word") CHECK(ids.size() == 5);
  }
}

TEST_CASE("training is reproducible and trains from sentences in memory", "[text][cpu]") {
  const TempDir dir;
  auto o = small_options(50);
  o.seed = 17;
  o.max_sentences = 200;  // sampled with the seed
  Tokenizer::train(captions(), "captions", dir.path() / "a", o);
  Tokenizer::train(captions(), "captions", dir.path() / "b", o);
  const std::string a = read_text(dir.path() / "a.model");
  CHECK(!a.empty());
  CHECK(a == read_text(dir.path() / "b.model"));

  o.special_tokens = {"<sep>"};
  Tokenizer::train(captions(), "captions", dir.path() / "c", o);
  const auto tok = Tokenizer::load(dir.path() / "c.model");
  CHECK(tok.special_id("<sep>") == 4);
  CHECK_THROWS_AS(tok.special_id("<video>"), longnet::ConfigError);
}

TEST_CASE("tokenizer errors name the file and the reason", "[text][cpu]") {
  const TempDir dir;
  const auto corpus = dir.write("corpus.txt", corpus_text());

  SECTION("missing input") {
    try {
      Tokenizer::train({dir.path() / "absent.txt"}, dir.path() / "m", small_options());
      FAIL("no error");
    } catch (const longnet::ConfigError& e) {
      CHECK(message_has(e, "absent.txt"));
    }
  }
  SECTION("vocabulary larger than the text allows") {
    try {
      Tokenizer::train({corpus}, dir.path() / "m", small_options(5000));
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, "corpus.txt"));
      CHECK(message_has(e, "5000"));
    }
    CHECK_FALSE(fs::exists(dir.path() / "m.model"));
    CHECK_FALSE(fs::exists(dir.path() / "m.vocab"));
  }
  SECTION("bad options") {
    auto o = small_options();
    o.model_type = "trigram";
    CHECK_THROWS_AS(Tokenizer::train({corpus}, dir.path() / "m", o), longnet::ConfigError);
    CHECK_THROWS_AS(Tokenizer::train({corpus}, dir.path() / "m", small_options(6)), longnet::ConfigError);
    o = small_options();
    o.max_sentences = 50;  // SentencePiece needs more than 100
    CHECK_THROWS_AS(Tokenizer::train({corpus}, dir.path() / "m", o), longnet::ConfigError);
    o = small_options();
    o.special_tokens = {"<a>", "<a>"};
    CHECK_THROWS_AS(Tokenizer::train({corpus}, dir.path() / "m", o), longnet::ConfigError);
    CHECK_THROWS_AS(Tokenizer::train(std::vector<std::string>{"", ""}, "empty", dir.path() / "m", small_options()),
                    longnet::DataError);
  }
  SECTION("missing or corrupt model, ids out of range") {
    CHECK_THROWS_AS(Tokenizer::load(dir.path() / "none.model"), longnet::ConfigError);
    const auto bad = dir.write("bad.model", "this is not a protobuf");
    try {
      Tokenizer::load(bad);
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      CHECK(message_has(e, "bad.model"));
    }
    Tokenizer::train({corpus}, dir.path() / "m", small_options());
    const auto tok = Tokenizer::load(dir.path() / "m.model");
    CHECK_THROWS_AS(tok.decode({5, 60}), longnet::DataError);
    CHECK_THROWS_AS(tok.decode({-1}), longnet::DataError);
    CHECK_THROWS_AS(tok.id_to_piece(1000), longnet::DataError);
  }
}
