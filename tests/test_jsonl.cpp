#include "io/jsonl.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "core/error.h"
#include "core/json.h"
#include "test_util.h"

namespace aligner {
namespace {

using test::error_of;
using test::write_temp;

TEST(Jsonl, IndexesNonBlankLinesAndKeepsLineNumbers) {
  // A byte order mark, blank and whitespace-only lines, CRLF, and no newline at the end.
  std::string path = write_temp("index.jsonl", "\xEF\xBB\xBF{\"a\": 1}\n\n  \t\n{\"a\": 2}\r\n\n{\"a\": 3}");
  JsonlFile f(path);
  ASSERT_EQ(f.size(), 3);
  EXPECT_EQ(f.line_number(0), 1);
  EXPECT_EQ(f.line_number(1), 4);
  EXPECT_EQ(f.line_number(2), 6);
  EXPECT_EQ(f.where(1), path + ":4");
  EXPECT_EQ(f.read(0)["a"], 1);
  EXPECT_EQ(f.read(1)["a"], 2);
  EXPECT_EQ(f.read(2)["a"], 3);
  EXPECT_EQ(f.read_text(2), "{\"a\": 3}");
}

TEST(Jsonl, RandomAccessOverManyLines) {
  std::string content;
  for (int i = 0; i < 20000; ++i)
    content += "{\"i\": " + std::to_string(i) + ", \"s\": \"" + std::string(i % 7, 'x') + "\"}\n";
  JsonlFile f(write_temp("many.jsonl", content));
  ASSERT_EQ(f.size(), 20000);
  for (int64_t i : {19999, 0, 12345, 7, 19998}) {
    nlohmann::json j = f.read(i);
    EXPECT_EQ(j["i"], i);
    EXPECT_EQ(j["s"].get<std::string>().size(), static_cast<size_t>(i % 7));
    EXPECT_EQ(f.line_number(i), i + 1);
  }
}

TEST(Jsonl, MovedFileStillReads) {
  JsonlFile a(write_temp("move.jsonl", "{\"x\": \"y\"}\n"));
  JsonlFile b = std::move(a);
  EXPECT_EQ(b.read(0)["x"], "y");
}

TEST(Jsonl, MalformedLineNamesFileAndLine) {
  std::string path = write_temp("bad.jsonl", "{\"a\": 1}\n\n{\"a\": \n[1, 2]\n");
  JsonlFile f(path);
  ASSERT_EQ(f.size(), 3);
  std::string msg = error_of([&] { f.read(1); });
  EXPECT_NE(msg.find(path + ":3: invalid JSON"), std::string::npos) << msg;
  msg = error_of([&] { f.read(2); });
  EXPECT_NE(msg.find(path + ":4: expected a JSON object, got array"), std::string::npos) << msg;
  msg = error_of([&] { f.read(3); });
  EXPECT_NE(msg.find("out of range"), std::string::npos) << msg;
}

// Deep enough to overflow the stack of a recursive walk (a copy, a dump), were it parsed.
TEST(Jsonl, DeeplyNestedLineNamesFileAndLine) {
  const std::string path = write_temp(
      "deep.jsonl", "{\"a\": 1}\n{\"a\": " + std::string(100000, '[') + std::string(100000, ']') + "}\n");
  JsonlFile f(path);
  EXPECT_EQ(f.read(0)["a"], 1);
  const std::string msg = error_of([&] { f.read(1); });
  EXPECT_NE(msg.find(path + ":2: JSON nested deeper than 256 levels"), std::string::npos) << msg;
}

TEST(Json, DepthIsBoundedAndCountsOnlyBracketsOutsideStrings) {
  const std::string deepest = std::string(kMaxJsonDepth, '[') + std::string(kMaxJsonDepth, ']');
  EXPECT_TRUE(parse_json(deepest, "x.json").is_array());
  std::string msg = error_of([&] { parse_json("[" + deepest + "]", "x.json"); });
  EXPECT_EQ(msg, "x.json: JSON nested deeper than 256 levels");
  // Brackets inside strings, after an escaped quote too, are text.
  const std::string text = std::string(1000, '[') + "\\\"" + std::string(1000, '{');
  EXPECT_EQ(parse_json("{\"s\": \"" + text + "\"}", "x.json")["s"].get<std::string>().size(), 2001u);
  msg = error_of([&] { parse_json("{\"a\": ", "x.json"); });
  EXPECT_EQ(msg.rfind("x.json: invalid JSON: ", 0), 0u) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { read_json_file(testing::TempDir() + "no_such.json"); }).find("no_such.json"),
            std::string::npos);
}

// Found by fuzz/safetensors.cpp: nlohmann throws out_of_range, not parse_error, for these.
TEST(Json, NumbersBeyondADoubleAreInvalidJson) {
  for (const char* text : {"[1e400]", "{\"a\": -1e400}", "184467440737095516151e300"}) {
    const std::string msg = error_of([&] { parse_json(text, "x.json"); });
    EXPECT_EQ(msg.rfind("x.json: invalid JSON: ", 0), 0u) << msg;
  }
  const std::string path = write_temp("overflow.jsonl", "{\"a\": 1}\n{\"a\": 1e999}\n");
  const std::string msg = error_of([&] { JsonlFile(path).read(1); });
  EXPECT_NE(msg.find(path + ":2: invalid JSON"), std::string::npos) << msg;
}

TEST(Jsonl, EmptyAndMissingFilesAreErrors) {
  std::string empty = write_temp("empty.jsonl", "");
  EXPECT_NE(error_of([&] { JsonlFile f(empty); }).find(empty + ": empty file"), std::string::npos);
  std::string blank = write_temp("blank.jsonl", "\n  \n\r\n");
  EXPECT_NE(error_of([&] { JsonlFile f(blank); }).find("empty file"), std::string::npos);
  std::string missing = testing::TempDir() + "no_such_file.jsonl";
  std::remove(missing.c_str());
  EXPECT_NE(error_of([&] { JsonlFile f(missing); }).find(missing + ": cannot open"), std::string::npos);
}

TEST(Jsonl, TypedFields) {
  nlohmann::json r = nlohmann::json::parse(
      R"({"s": "text", "n": 2.5, "i": 3, "f": 4.0, "b": true, "z": null, "o": {"k": 1}})");
  EXPECT_EQ(get_field<std::string>(r, "s", "f.jsonl:7"), "text");
  EXPECT_DOUBLE_EQ(get_field<double>(r, "n", "f.jsonl:7"), 2.5);
  EXPECT_DOUBLE_EQ(get_field<double>(r, "i", "f.jsonl:7"), 3.0);
  EXPECT_EQ(get_field<int64_t>(r, "i", "f.jsonl:7"), 3);
  EXPECT_EQ(get_field<int64_t>(r, "f", "f.jsonl:7"), 4);
  EXPECT_TRUE(get_field<bool>(r, "b", "f.jsonl:7"));
  EXPECT_EQ(get_optional_field<std::string>(r, "absent", "f.jsonl:7"), std::nullopt);
  EXPECT_EQ(get_optional_field<std::string>(r, "z", "f.jsonl:7"), std::nullopt);
  EXPECT_EQ(get_optional_field<double>(r, "n", "f.jsonl:7"), 2.5);

  std::string msg = error_of([&] { get_field<std::string>(r, "prompt", "f.jsonl:7"); });
  EXPECT_NE(msg.find("f.jsonl:7: missing field \"prompt\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("(fields present: b, f, i, n, o, s, z)"), std::string::npos) << msg;
  msg = error_of([&] { get_field<std::string>(r, "n", "f.jsonl:7"); });
  EXPECT_EQ(msg, "f.jsonl:7: field \"n\": expected a string, got number");
  msg = error_of([&] { get_field<int64_t>(r, "n", "f.jsonl:7"); });
  EXPECT_EQ(msg, "f.jsonl:7: field \"n\": expected an integer, got 2.5");
  msg = error_of([&] { get_optional_field<double>(r, "s", "f.jsonl:7"); });
  EXPECT_EQ(msg, "f.jsonl:7: field \"s\": expected a number, got string");
  msg = error_of([&] { get_field<bool>(r["o"], "k", "f.jsonl:7", "messages[2]"); });
  EXPECT_EQ(msg, "f.jsonl:7: field \"messages[2].k\": expected a boolean, got integer");
  msg = error_of([&] { get_field<std::string>(r["s"], "role", "f.jsonl:7", "messages[0]"); });
  EXPECT_EQ(msg, "f.jsonl:7: field \"messages[0]\": expected an object, got string");
}

}  // namespace
}  // namespace aligner
