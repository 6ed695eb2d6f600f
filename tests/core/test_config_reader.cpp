#include <catch2/catch.hpp>

#include "core/config_reader.h"
#include "core/error.h"

using longnet::ConfigError;
using longnet::config::Document;

TEST_CASE("typed accessors read values and defaults", "[core][cpu]") {
  const auto doc = Document::parse("[a]\nx = 3\ny = 2.5\nz = \"s\"\nb = true\nl = [1, 2]\n", "t.toml");
  const auto root = doc.root();
  const auto a = root.section("a");
  CHECK(a.integer("x") == 3);
  CHECK(a.number("y") == 2.5);
  CHECK(a.number("x") == 3.0);
  CHECK(a.string("z") == "s");
  CHECK(a.boolean("b"));
  CHECK(a.integer_list("l", {}) == std::vector<int64_t>{1, 2});
  CHECK(a.integer("missing", 7) == 7);
  a.finish();
  root.finish();
}

TEST_CASE("unknown keys are reported with position and suggestion", "[core][cpu]") {
  const auto doc = Document::parse("[a]\nsteps = 1\nstpes = 2\n", "t.toml");
  const auto a = doc.root().section("a");
  (void)a.integer("steps", 0);
  CHECK_THROWS_WITH(a.finish(), "t.toml:3:1: unknown key 'a.stpes'; did you mean 'steps'? (valid keys: steps)");
}

TEST_CASE("overrides are typed like the key they set", "[core][cpu]") {
  const auto doc = Document::parse("[a]\nn = 1\nname = \"x\"\n", "t.toml", {"a.n=5", "a.name=run7", "a.new=1"});
  const auto a = doc.root().section("a");
  CHECK(a.integer("n") == 5);
  CHECK(a.string("name") == "run7");
  CHECK_THROWS_WITH(a.finish(), Catch::StartsWith("--set a.new=1: unknown key 'a.new'"));

  const auto bad = Document::parse("[a]\nn = 1\n", "t.toml", {"a.n=many"});
  CHECK_THROWS_WITH(bad.root().section("a").integer("n"), "--set a.n=many: 'a.n' must be an integer, got a string");
  CHECK_THROWS_WITH(Document::parse("", "t.toml", {"novalue"}), "--set novalue: expected key.path=value");
  CHECK_THROWS_WITH(Document::parse("a = 1\n", "t.toml", {"a.b=1"}), "--set a.b=1: 'a' is not a table");
}

TEST_CASE("closest_match suggests plausible typos only", "[core][cpu]") {
  using longnet::config::closest_match;
  CHECK(closest_match("segment_lenghts", {"segment_lengths", "dilation_rates"}) == "segment_lengths");
  CHECK_FALSE(closest_match("zzzz", {"segment_lengths", "dilation_rates"}).has_value());
}
