// Dataset manifests: every key parsed and paths resolved against the manifest's folder, and each kind of mistake
// reported as a DataError that names the manifest, the line and the key.
#include "core/error.h"
#include "pipelines/manifest.h"
#include "tests/support/temp_dir.h"

#include <catch2/catch.hpp>

namespace fs = std::filesystem;
using longnet::pipelines::Manifest;
using longnet::pipelines::ManifestOptions;
using longnet::pipelines::Split;
using longnet::test::TempDir;

TEST_CASE("a manifest resolves paths, splits, captions and labels", "[pipelines][cpu]") {
  const TempDir dir;
  dir.write("data/videos/a.mp4", "v");
  dir.write("data/audio/a.wav", "a");
  dir.write("data/images/b.png", "i");
  const auto file = dir.write("data/manifest.jsonl",
                              "{\"id\": \"a\", \"split\": \"train\", \"video\": \"videos/a.mp4\", \"audio\": "
                              "\"audio/a.wav\", \"text\": \"one red square moving left\", \"label\": 2}\n"
                              "\n"
                              "{\"id\": \"b\", \"split\": \"val\", \"image\": \"images/b.png\", \"text\": [\"x y\", "
                              "\"z\"], \"label\": \"squares\"}\r\n"
                              "{\"id\": \"c\", \"text\": \"only text\"}\n"
                              "{\"id\": \"d\", \"split\": \"test\", \"video\": \"" +
                                  (dir.path() / "data/videos/a.mp4").string() + "\"}\n");
  const auto m = Manifest::load(file);
  REQUIRE(m.samples().size() == 4);

  const auto& a = m.samples()[0];
  CHECK(a.id == "a");
  CHECK(a.split == Split::train);
  CHECK(a.video == dir.path() / "data/videos/a.mp4");
  CHECK(a.audio == dir.path() / "data/audio/a.wav");
  CHECK_FALSE(a.image.has_value());
  CHECK(a.text == std::vector<std::string>{"one red square moving left"});
  CHECK(a.label_index == 2);
  CHECK_FALSE(a.label_name.has_value());
  CHECK(a.line == 1);

  const auto* b = m.find("b");
  REQUIRE(b != nullptr);
  CHECK(b->line == 3);  // blank lines count
  CHECK(b->split == Split::val);
  CHECK(b->image == dir.path() / "data/images/b.png");
  CHECK(b->text == std::vector<std::string>{"x y", "z"});
  CHECK(b->label_name == "squares");

  CHECK(m.samples()[2].split == Split::train);  // the default split
  CHECK(m.samples()[3].video == dir.path() / "data/videos/a.mp4");  // absolute paths stay as they are
  CHECK(m.find("nope") == nullptr);
  CHECK(m.split(Split::train).size() == 2);
  CHECK(m.split(Split::val).size() == 1);
  CHECK(m.split(Split::test).size() == 1);
  CHECK(m.captions() == std::vector<std::string>{"one red square moving left", "x y", "z", "only text"});
}

TEST_CASE("manifest errors name the file, the line and the key", "[pipelines][cpu]") {
  const TempDir dir;
  dir.write("v.mp4", "v");
  const std::string good = "{\"id\": \"ok\", \"text\": \"fine\"}\n";
  struct Case {
    std::string line;
    std::string expected;  // in the message after "m.jsonl:2: "
  };
  const std::vector<Case> cases = {
      {"{\"id\": \"x\", \"text\": \"t\"", "not valid JSON"},
      {"[1, 2]", "must be a JSON object"},
      {"{\"id\": \"x\", \"txet\": \"t\"}", "key 'txet': unknown key (did you mean 'text'?)"},
      {"{\"text\": \"t\"}", "key 'id': missing"},
      {"{\"id\": 7, \"text\": \"t\"}", "key 'id': must be a non-empty string"},
      {"{\"id\": \"ok\", \"text\": \"t\"}", "key 'id': duplicate id 'ok' (first on line 1)"},
      {"{\"id\": \"x\", \"split\": \"training\", \"text\": \"t\"}", "key 'split': must be \"train\", \"val\" or \"test\""},
      {"{\"id\": \"x\", \"video\": 3}", "key 'video': must be a file path"},
      {"{\"id\": \"x\", \"video\": \"\"}", "key 'video': an empty path"},
      {"{\"id\": \"x\", \"audio\": \"missing.wav\"}", "key 'audio': file"},
      {"{\"id\": \"x\", \"text\": [\"a\", 5]}", "key 'text': element 1 must be a string"},
      {"{\"id\": \"x\", \"text\": []}", "key 'text': an empty list"},
      {"{\"id\": \"x\", \"text\": \"  \"}", "key 'text': a caption is empty"},
      {"{\"id\": \"x\", \"text\": {\"a\": 1}}", "key 'text': must be a string or a list of strings"},
      {"{\"id\": \"x\", \"text\": \"t\", \"label\": true}", "key 'label': must be an integer"},
      {"{\"id\": \"x\", \"split\": \"val\"}", "sample 'x' is empty"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.line);
    const auto file = dir.write("m.jsonl", good + c.line + "\n");
    try {
      Manifest::load(file);
      FAIL("no error");
    } catch (const longnet::DataError& e) {
      const std::string msg = e.what();
      CAPTURE(msg);
      CHECK(msg.rfind(file.string() + ":2: ", 0) == 0);
      CHECK(msg.find(c.expected) != std::string::npos);
    }
  }

  // A missing media file is accepted when the files are not checked (e.g. only the captions are wanted).
  const auto m = Manifest::parse("{\"id\": \"x\", \"audio\": \"missing.wav\"}\n", dir.path() / "m.jsonl",
                                 ManifestOptions{.check_files = false});
  CHECK(m.samples().size() == 1);

  CHECK_THROWS_AS(Manifest::load(dir.path() / "absent.jsonl"), longnet::DataError);
  CHECK_THROWS_AS(Manifest::parse("\n\n", dir.path() / "empty.jsonl"), longnet::DataError);
}
