// `longnet tokenizer train|encode|decode`: SentencePiece tokenizers from the command line (modalities/tokenizer.h).
//
//   longnet tokenizer train --input corpus.txt --output models/spm --vocab-size 8000
//   longnet tokenizer train --manifest data/demo/manifest.jsonl --output models/captions --vocab-size 500
//   longnet tokenizer encode --model models/spm.model "<video> two red squares"   # prints ids
//   longnet tokenizer decode --model models/spm.model 4 27 311 9                  # prints text
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "apps/longnet/commands.h"
#include "core/error.h"
#include "modalities/tokenizer.h"
#include "pipelines/manifest.h"

namespace longnet::app {

namespace {

struct TrainArgs {
  std::vector<std::string> inputs;
  std::string manifest;
  std::string output;
  std::vector<std::string> special;
  bool no_special = false;
  text::TrainOptions options;
};

struct EncodeArgs {
  std::string model;
  std::vector<std::string> text;
  bool bos = false, eos = false, pieces = false;
};

struct DecodeArgs {
  std::string model;
  std::vector<int32_t> ids;
};

void train(const TrainArgs& a) {
  if (a.inputs.empty() == a.manifest.empty()) {
    throw ConfigError("tokenizer train: give either --input FILE... or --manifest FILE");
  }
  text::TrainOptions options = a.options;
  if (a.no_special) {
    options.special_tokens.clear();
  } else if (!a.special.empty()) {
    options.special_tokens = a.special;
  }
  if (!a.manifest.empty()) {
    // Only the captions are read: the media files need not be present.
    const auto manifest = pipelines::Manifest::load(a.manifest, {.check_files = false});
    text::Tokenizer::train(manifest.captions(), a.manifest + " (captions)", a.output, options);
  } else {
    const std::vector<std::filesystem::path> files(a.inputs.begin(), a.inputs.end());
    text::Tokenizer::train(files, a.output, options);
  }
  const auto tok = text::Tokenizer::load(a.output + ".model");
  std::cout << "wrote " << a.output << ".model and " << a.output << ".vocab (" << tok.vocab_size() << " pieces, "
            << options.model_type << ")\n";
}

std::string joined(const std::vector<std::string>& words) {
  std::string s;
  for (const auto& w : words) s += (s.empty() ? "" : " ") + w;
  return s;
}

}  // namespace

void add_tokenizer_commands(CLI::App& app) {
  CLI::App* tok = app.add_subcommand("tokenizer", "Train SentencePiece tokenizers, encode and decode text");
  tok->require_subcommand(1);

  auto t = std::make_shared<TrainArgs>();
  CLI::App* train_cmd = tok->add_subcommand("train", "Train a tokenizer; writes PREFIX.model and PREFIX.vocab");
  auto* input = train_cmd->add_option("--input", t->inputs, "UTF-8 text files, one sentence per line");
  auto* manifest = train_cmd->add_option("--manifest", t->manifest, "Train on the captions of a dataset manifest");
  input->excludes(manifest);
  train_cmd->add_option("--output", t->output, "Output prefix (PREFIX.model, PREFIX.vocab)")->required();
  train_cmd->add_option("--vocab-size", t->options.vocab_size, "Pieces in the vocabulary, special tokens included")
      ->required();
  train_cmd->add_option("--model-type", t->options.model_type, "unigram, bpe, char or word")->capture_default_str();
  train_cmd->add_option("--character-coverage", t->options.character_coverage,
                        "Fraction of characters covered; the rarest rest become <unk>")
      ->capture_default_str();
  train_cmd
      ->add_option("--special", t->special,
                   "User-defined pieces, each always one token (default: <video> <audio> <image> <text>)")
      ->delimiter(',');
  train_cmd->add_flag("--no-special", t->no_special, "No user-defined pieces (only <unk> <s> </s> <pad>)");
  train_cmd->add_option("--seed", t->options.seed, "Seed of sentence sampling")->capture_default_str();
  train_cmd->add_option("--threads", t->options.threads, "Training threads")->capture_default_str();
  train_cmd->add_option("--max-sentences", t->options.max_sentences,
                        "Sample this many lines (more than 100), 0 for all")
      ->capture_default_str();
  train_cmd->callback([t] { train(*t); });

  auto e = std::make_shared<EncodeArgs>();
  CLI::App* encode = tok->add_subcommand("encode", "Print the ids of a text, space-separated on one line");
  encode->add_option("--model", e->model, "Tokenizer model (.model)")->required();
  encode->add_option("text", e->text, "Text (several words are joined with spaces)")->required();
  encode->add_flag("--bos", e->bos, "Start with the BOS id");
  encode->add_flag("--eos", e->eos, "End with the EOS id");
  encode->add_flag("--pieces", e->pieces, "Print the pieces instead of the ids");
  encode->callback([e] {
    const auto tokenizer = text::Tokenizer::load(e->model);
    const std::string text = joined(e->text);
    std::string line;
    if (e->pieces) {
      for (const auto& p : tokenizer.encode_pieces(text)) line += (line.empty() ? "" : " ") + p;
    } else {
      for (const auto id : tokenizer.encode(text, e->bos, e->eos)) {
        line += (line.empty() ? "" : " ") + std::to_string(id);
      }
    }
    std::cout << line << "\n";
  });

  auto d = std::make_shared<DecodeArgs>();
  CLI::App* decode = tok->add_subcommand("decode", "Print the text of ids");
  decode->add_option("--model", d->model, "Tokenizer model (.model)")->required();
  decode->add_option("ids", d->ids, "Ids")->required();
  decode->callback([d] { std::cout << text::Tokenizer::load(d->model).decode(d->ids) << "\n"; });
}

}  // namespace longnet::app
