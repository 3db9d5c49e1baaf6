// The Jinja engine against Python's jinja2 set up as transformers sets it up: language features
// (features.jsonl) and real chat templates on several conversations (expected.jsonl), both written
// by scripts/make_jinja_fixtures.py; then errors, {% generation %} spans and hostile templates.
// Torch-free, so it also builds on its own with src/text/jinja.cpp and src/text/utf8.cpp.
#include "text/jinja.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

const fs::path kDir = fs::path(ALIGNER_SOURCE_DIR) / "tests" / "fixtures";

std::vector<ojson> read_lines(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << path << " is missing: generate it with `python3 scripts/make_jinja_fixtures.py`";
  std::vector<ojson> out;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(ojson::parse(line));
  }
  return out;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// strftime_now as the fixtures pin it: 2024-07-26 12:00.
jinja::RenderOptions pinned_time() {
  std::tm tm{};
  tm.tm_year = 124;
  tm.tm_mon = 6;
  tm.tm_mday = 26;
  tm.tm_hour = 12;
  tm.tm_wday = 5;
  tm.tm_yday = 207;
  jinja::RenderOptions options;
  options.now = tm;
  return options;
}

std::string render(std::string_view source, const ojson& variables = ojson::object()) {
  return jinja::render(*jinja::parse(source, "t"), variables, pinned_time()).text;
}

// The message of the aligner::Error that rendering throws; a test failure if it throws none.
std::string error_of(std::string_view source, const ojson& variables = ojson::object()) {
  try {
    render(source, variables);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error from: " << source;
  return {};
}

TEST(Jinja, MatchesJinja2OnLanguageFeatures) {
  const auto cases = read_lines(kDir / "chat_templates" / "features.jsonl");
  ASSERT_GE(cases.size(), 50u);
  for (const ojson& c : cases) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const std::string source = c["template"];
    if (c.contains("error")) {
      EXPECT_THROW(render(source, c["variables"]), Error) << "jinja2: " << c["error"];
    } else {
      try {
        EXPECT_EQ(render(source, c["variables"]), c["text"].get<std::string>());
      } catch (const Error& e) {
        ADD_FAILURE() << e.what();
      }
    }
  }
}

TEST(Jinja, RendersRealChatTemplatesAsJinja2Does) {
  std::map<std::string, std::shared_ptr<const jinja::Template>> templates;
  for (const auto& entry : fs::directory_iterator(kDir / "chat_templates")) {
    if (entry.path().extension() == ".jinja") {
      const std::string name = entry.path().filename().string();
      templates[name] = jinja::parse(read_file(entry.path()), name);
    }
  }
  const auto config = ojson::parse(read_file(kDir / "tokenizers" / "mistral-v0.3" / "tokenizer_config.json"));
  templates["mistral-v0.3/tokenizer_config.json"] =
      jinja::parse(config["chat_template"].get<std::string>(), "mistral-v0.3");
  ASSERT_EQ(templates.size(), 11u);

  const auto rows = read_lines(kDir / "chat_templates" / "expected.jsonl");
  ASSERT_EQ(rows.size(), 11u * 8 * 2);  // templates x conversations x add_generation_prompt
  size_t same = 0, raised = 0;
  for (const ojson& row : rows) {
    const std::string name = row["template"];
    SCOPED_TRACE(name + " / " + row["conversation"].get<std::string>() +
                 (row["add_generation_prompt"].get<bool>() ? " / generation prompt" : ""));
    ASSERT_TRUE(templates.count(name));
    if (row.contains("error")) {
      try {
        jinja::render(*templates[name], row["variables"]);
        ADD_FAILURE() << "jinja2 raised: " << row["error"];
      } catch (const Error& e) {
        // raise_exception's message surfaces as is, after the template and line.
        EXPECT_NE(std::string(e.what()).find(row["error"].get<std::string>()), std::string::npos) << e.what();
        ++raised;
      }
      continue;
    }
    const std::string text = jinja::render(*templates[name], row["variables"]).text;
    EXPECT_EQ(text, row["text"].get<std::string>());
    same += text == row["text"].get<std::string>();
  }
  EXPECT_EQ(same + raised, rows.size());
}

TEST(Jinja, ErrorsNameTheTemplateAndLine) {
  EXPECT_EQ(error_of("line 1\n{% if x %}\n{{ x | nofilter }}\n{% endif %}"),
            "t, line 3: no filter named 'nofilter'");
  EXPECT_EQ(error_of("a\n\n{{ raise_exception('Roles must alternate') }}"),
            "t, line 3: Roles must alternate");
  EXPECT_EQ(error_of("{% for m in messages %}\n{% endif %}"),
            "t, line 2: unexpected 'endif', expected 'endfor' to close the 'for' at line 1");
  EXPECT_EQ(error_of("\n{% if x %}never closed"), "t, line 2: 'if' is never closed (expected 'endif')");
  EXPECT_EQ(error_of("{{ 1 +* 2 }}"), "t, line 1: expected an expression, got '*'");
  EXPECT_EQ(error_of("{% include 'other.jinja' %}"), "t, line 1: unknown or unsupported tag 'include'");
  EXPECT_EQ(error_of("{# unterminated"), "t, line 1: missing end of comment tag");
  EXPECT_EQ(error_of("\n\n{{ m.content.strip() }}", {{"m", {{"role", "user"}}}}),
            "t, line 3: 'dict' object has no attribute 'content'");
  EXPECT_EQ(error_of("{{ messages[0]['role'] }}", {{"messages", ojson::array()}}),
            "t, line 1: 'list' object has no element 0");
  EXPECT_EQ(error_of("{{ 'a' + 1 }}"), "t, line 1: can only concatenate str (not \"int\") to str");
  EXPECT_EQ(error_of("{% set x = 1 %}{% set x.y = 2 %}"),
            "t, line 1: cannot assign attribute on non-namespace object");
  try {
    jinja::parse("{% if %}", "tokenizer_config.json chat_template");
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(
        e.what(),
        "tokenizer_config.json chat_template, line 1: expected an expression, got end of statement block");
  }
  EXPECT_THROW(jinja::parse("\xff\xfe", "t"), Error);
}

TEST(Jinja, SandboxKeepsTheDataImmutable) {
  const ojson vars = {{"l", {1, 2}}, {"d", {{"a", 1}}}};
  EXPECT_EQ(error_of("{{ l.append(3) }}", vars),
            "t, line 1: access to attribute 'append' of 'list' object is unsafe");
  EXPECT_EQ(error_of("{{ d.update({'b': 2}) }}", vars),
            "t, line 1: access to attribute 'update' of 'dict' object is unsafe");
  EXPECT_EQ(error_of("{{ d.__class__ }}{{ l.__len__() }}", vars),
            "t, line 1: 'list' object has no attribute '__len__'");
  // What the template assigns stays inside the render.
  EXPECT_EQ(render("{% set l = l + [3] %}{{ l }}", vars), "[1, 2, 3]");
  EXPECT_EQ(vars["l"].size(), 2u);
}

TEST(Jinja, KeepsTheKeyOrderOfTheData) {
  const auto vars = ojson::parse(R"({"tool": {"name": "f", "arguments": {"z": 1, "a": [true, null, 1.5]}}})");
  EXPECT_EQ(render("{{ tool | tojson }}", vars),
            R"({"name": "f", "arguments": {"z": 1, "a": [true, null, 1.5]}})");
  EXPECT_EQ(render("{{ tool.arguments | tojson(indent=2) }}", vars),
            "{\n  \"z\": 1,\n  \"a\": [\n    true,\n    null,\n    1.5\n  ]\n}");
  EXPECT_EQ(render("{% for k, v in tool.arguments.items() %}{{ k }}{% endfor %}", vars), "za");
}

TEST(Jinja, GenerationBlocksMarkWhatTheyRender) {
  const auto tmpl = jinja::parse(
      "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</s>"
      "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}",
      "t");
  EXPECT_TRUE(jinja::uses_generation(*tmpl));
  EXPECT_FALSE(jinja::uses_generation(*jinja::parse("{{ x }}", "t")));
  const auto vars = ojson::parse(
      R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})");
  const jinja::Rendered r = jinja::render(*tmpl, vars);
  EXPECT_EQ(r.text, "<user>hi\n<assistant>yo</s>\n<user>q\n<assistant>a</s>\n");
  ASSERT_EQ(r.generation.size(), 2u);
  EXPECT_EQ(r.text.substr(r.generation[0].first, r.generation[0].second - r.generation[0].first), "yo</s>");
  EXPECT_EQ(r.text.substr(r.generation[1].first, r.generation[1].second - r.generation[1].first), "a</s>");
}

TEST(Jinja, HostileTemplatesFailWithoutHarm) {
  // Each is bounded: time, recursion, output, string and list sizes, nesting in the source and in
  // the data a template builds.
  EXPECT_NE(error_of("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
                .find("steps"),
            std::string::npos);
  EXPECT_NE(error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").find("recurses"),
            std::string::npos);
  EXPECT_NE(error_of("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}").find("bytes"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 1000000000000 }}").find("bytes"), std::string::npos);
  EXPECT_NE(error_of("{{ [1] * 1000000000000 }}").find("items"), std::string::npos);
  // Found by fuzz/jinja.cpp: lists each within bounds, gigabytes together.
  std::string many;
  for (int i = 0; i < 40; ++i) many += "{% set v" + std::to_string(i) + " = [1] * 1000000 %}";
  EXPECT_NE(error_of(many + "{{ v0 | length }}").find("list items in all"), std::string::npos);
  EXPECT_NE(
      error_of("{% set ns = namespace(x=[]) %}{% for i in range(10000) %}{% set ns.x = [ns.x] %}{% endfor %}")
          .find("nested"),
      std::string::npos);
  // Found by fuzz/jinja.cpp: a namespace that holds itself printed without end (and never freed).
  EXPECT_NE(
      error_of("{% set ns = namespace(a=1) %}{% set ns.a = ns %}{{ ns }}").find("cannot hold a namespace"),
      std::string::npos);
  EXPECT_NE(
      error_of("{% set ns = namespace(a=1) %}{% set ns.a = [{'k': ns}] %}").find("cannot hold a namespace"),
      std::string::npos);
  EXPECT_EQ(
      render("{% set ns = namespace(a=1) %}{% set ns.a = [2, {'k': 3}] %}{{ ns }} {{ [namespace(b=ns.a)] }}"),
      "<Namespace {'a': [2, {'k': 3}]}> [<Namespace {'b': [2, {'k': 3}]}>]");
  EXPECT_NE(error_of("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}")
                .find("nests too deeply"),
            std::string::npos);
  EXPECT_NE(
      error_of("{{ " + std::string(20000, '[') + std::string(20000, ']') + " }}").find("nests too deeply"),
      std::string::npos);
  EXPECT_NE(error_of("{{ 9223372036854775807 + 1 }}").find("overflow"), std::string::npos);
  EXPECT_NE(error_of("{{ 2 ** 64 }}").find("overflow"), std::string::npos);
  EXPECT_NE(error_of("{{ range(0, 10000000000, 1) | length }}").find("range"), std::string::npos);
  std::string chain = "{{ 1";
  for (int i = 0; i < 100000; ++i) chain += " + 1";
  EXPECT_NE(error_of(chain + " }}").find("nests too deeply"), std::string::npos);
  std::string ifs;
  for (int i = 0; i < 300; ++i) ifs += "{% if true %}";
  EXPECT_NE(error_of(ifs).find("nests too deeply"), std::string::npos);
}

TEST(Jinja, StrftimeNowFormatsTheGivenTime) {
  EXPECT_EQ(render("{{ strftime_now('%d %b %Y') }}"), "26 Jul 2024");
  // Without a pinned time it is the current local time.
  std::time_t t = std::time(nullptr);
  std::tm now;
  localtime_r(&t, &now);
  char year[8];
  std::strftime(year, sizeof year, "%Y", &now);
  EXPECT_EQ(jinja::render(*jinja::parse("{{ strftime_now('%Y') }}", "t"), ojson::object()).text, year);
}

}  // namespace
}  // namespace aligner
