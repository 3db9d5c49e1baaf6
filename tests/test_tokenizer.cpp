// Tokenizers against Hugging Face: expected.jsonl holds what `tokenizers` and `sentencepiece` give
// for corpus.jsonl (scripts/make_tokenizer_fixtures.py writes it); the other tests need no fixture.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <thread>
#include <tuple>

#include "core/error.h"
#include "text/regex.h"
#include "text/tokenizer.h"
#include "text/utf8.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

const fs::path kDir = fs::path(ALIGNER_SOURCE_DIR) / "tests" / "fixtures" / "tokenizers";

std::vector<std::string> corpus() {
  std::ifstream in(kDir / "corpus.jsonl");
  std::vector<std::string> lines;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) lines.push_back(json::parse(line).at("text").get<std::string>());
  }
  return lines;
}

// By value: a reference parameter bound to a temporary makes GCC 13 warn (-Wdangling-reference)
// wherever the returned reference is kept, although it points into the static map.
const Tokenizer& cached(std::string_view relative) {
  static std::map<std::string, std::unique_ptr<Tokenizer>> tokenizers;
  auto& slot = tokenizers[std::string(relative)];
  if (!slot) slot = load_tokenizer((kDir / relative).string());
  return *slot;
}

std::string ids_text(const std::vector<int32_t>& ids) {
  return json(ids).dump();
}

TEST(TokenizerFixture, MatchesHuggingFace) {
  fs::path expected_path = kDir / "expected.jsonl";
  ASSERT_TRUE(fs::exists(expected_path))
      << expected_path << " is missing: generate it with `python3 scripts/make_tokenizer_fixtures.py` "
      << "(needs the Python packages tokenizers and sentencepiece) and commit it";
  std::vector<std::string> texts = corpus();
  ASSERT_FALSE(texts.empty());

  std::ifstream in(expected_path);
  std::map<std::string, std::string> files;  // tokenizer name -> file
  std::string line;
  int records = 0, mismatches = 0;
  std::map<std::string, int> checked;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    json r = json::parse(line);
    if (r.contains("meta")) continue;
    std::string name = r.at("tokenizer");
    if (r.contains("file")) {
      files[name] = r["file"];
      EXPECT_EQ(cached(files[name]).vocab_size(), r.at("vocab_size").get<int64_t>()) << name;
      continue;
    }
    ASSERT_TRUE(files.count(name)) << "record for " << name << " before its header";
    const Tokenizer& tok = cached(files[name]);
    size_t index = r.at("line");
    ASSERT_LT(index, texts.size()) << "expected.jsonl is older than corpus.jsonl: regenerate it";
    const std::string& text = texts[index];
    ++records;
    ++checked[name];

    auto ids = tok.encode(text);
    auto plain = tok.encode(text, false);
    auto expected_ids = r.at("ids").get<std::vector<int32_t>>();
    auto expected_plain = r.at("ids_no_special").get<std::vector<int32_t>>();
    std::string decoded = tok.decode(expected_ids);
    std::string decoded_skip = tok.decode(expected_ids, true);
    bool ok = ids == expected_ids && plain == expected_plain && decoded == r.at("decoded") &&
              decoded_skip == r.at("decoded_skip_special");
    if (!ok && ++mismatches <= 20) {
      ADD_FAILURE() << name << " line " << index << " text " << json(text).dump() << "\n  ids      "
                    << ids_text(ids) << "\n  expected " << ids_text(expected_ids) << "\n  plain    "
                    << ids_text(plain) << "\n  expected " << ids_text(expected_plain) << "\n  decoded  "
                    << json(decoded).dump() << "\n  expected " << r.at("decoded").dump() << "\n  skip     "
                    << json(decoded_skip).dump() << "\n  expected " << r.at("decoded_skip_special").dump();
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << records << " records";
  for (const char* name : {"gpt2", "mistral-v0.3", "llama3-style-bpe6k", "llama2-sp", "mistral-v0.3-sp"}) {
    EXPECT_TRUE(files.count(name)) << name << " is missing from expected.jsonl";
  }
  for (const auto& [name, file] : files) {
    EXPECT_EQ(checked[name], static_cast<int>(texts.size())) << name << " lines in expected.jsonl";
  }
}

TEST(Tokenizer, Gpt2KnownIds) {
  const Tokenizer& gpt2 = cached("gpt2");
  EXPECT_EQ(gpt2.encode("Hello world"), (std::vector<int32_t>{15496, 995}));
  EXPECT_EQ(gpt2.encode(" Hello"), (std::vector<int32_t>{18435}));
  EXPECT_EQ(gpt2.encode("Hello world<|endoftext|>"), (std::vector<int32_t>{15496, 995, 50256}));
  EXPECT_EQ(gpt2.encode(""), (std::vector<int32_t>{}));
  EXPECT_EQ(gpt2.vocab_size(), 50257);
  EXPECT_EQ(gpt2.decode({15496, 995}), "Hello world");
  EXPECT_EQ(gpt2.token_to_id("Hello"), 15496);
  EXPECT_EQ(gpt2.id_to_token(995), "\xC4\xA0world");  // "Ġworld"
  EXPECT_FALSE(gpt2.token_to_id("no such token"));
  EXPECT_THROW(gpt2.id_to_token(50257), Error);
}

TEST(Tokenizer, ByteLevelRoundTripsTheCorpus) {
  for (const char* name : {"gpt2", "llama3-style-bpe6k"}) {
    const Tokenizer& tok = cached(name);
    for (const std::string& text : corpus()) {
      EXPECT_EQ(tok.decode(tok.encode(text, false)), text) << name;
    }
  }
}

TEST(Tokenizer, SpecialTokensInTextAreSingleIds) {
  const Tokenizer& gpt2 = cached("gpt2");
  auto ids = gpt2.encode("a<|endoftext|>b", false);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 50256), 1);
  EXPECT_EQ(ids.size(), 3u);

  const Tokenizer& llama3 = cached("llama3-style-bpe6k");
  ids = llama3.encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", true);
  ASSERT_GE(ids.size(), 5u);
  EXPECT_EQ(ids[0], 0);  // <|begin_of_text|> from the template
  EXPECT_EQ(ids[1], *llama3.token_to_id("<|start_header_id|>"));
  EXPECT_EQ(ids.back(), *llama3.token_to_id("<|eot_id|>"));

  const Tokenizer& mistral = cached("mistral-v0.3/tokenizer.json");
  ids = mistral.encode("[INST] Hi [/INST] Hello</s>", true);
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(ids[1], 3);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 4), 1);
  // " Hi " keeps its trailing space as a token of its own.
  EXPECT_EQ(mistral.decode(ids, true), "Hi  Hello");
}

TEST(Tokenizer, SpecialIdsComeFromTheConfig) {
  const Tokenizer& gpt2 = cached("gpt2");
  EXPECT_EQ(gpt2.special().bos, 50256);
  EXPECT_EQ(gpt2.special().eos, 50256);
  EXPECT_FALSE(gpt2.special().pad);

  const Tokenizer& mistral = cached("mistral-v0.3");
  EXPECT_EQ(mistral.special().bos, 1);
  EXPECT_EQ(mistral.special().eos, 2);
  EXPECT_EQ(mistral.special().unk, 0);
  EXPECT_EQ(mistral.special().eos_text, "</s>");
  EXPECT_FALSE(mistral.special().pad);
  EXPECT_NE(mistral.special().chat_template.find("[INST]"), std::string::npos);

  const Tokenizer& llama3 = cached("llama3-style-bpe6k/tokenizer.json");
  EXPECT_EQ(llama3.special().bos, 0);
  EXPECT_EQ(llama3.special().eos, *llama3.token_to_id("<|eot_id|>"));
}

TEST(Tokenizer, SentencePieceAddsBosFirst) {
  for (const char* name : {"llama2/tokenizer.model", "mistral-v0.3/tokenizer.model"}) {
    const Tokenizer& sp = cached(name);
    ASSERT_TRUE(sp.special().bos) << name;
    auto ids = sp.encode("Hello world");
    ASSERT_GE(ids.size(), 2u) << name;
    EXPECT_EQ(ids[0], *sp.special().bos) << name;
    auto plain = sp.encode("Hello world", false);
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), plain) << name;
    EXPECT_EQ(sp.decode(ids), "Hello world") << name;
    EXPECT_EQ(sp.encode(""), std::vector<int32_t>{*sp.special().bos}) << name;
  }
  EXPECT_EQ(cached("llama2/tokenizer.model").vocab_size(), 32000);
  EXPECT_EQ(cached("llama2/tokenizer.model").special().eos, 2);
}

// A folder holding one hand-written tokenizer.json, removed afterwards.
struct TempTokenizer {
  fs::path dir;
  explicit TempTokenizer(const std::string& contents) {
    static int count = 0;
    dir = fs::temp_directory_path() /
          ("aligner_tok_" + std::to_string(::getpid()) + "_" + std::to_string(++count));
    fs::create_directories(dir);
    std::ofstream(dir / "tokenizer.json") << contents;
  }
  ~TempTokenizer() { fs::remove_all(dir); }
  std::string file() const { return (dir / "tokenizer.json").string(); }
};

std::string load_error(const std::string& path) {
  try {
    load_tokenizer(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  EXPECT_NE(load_error("/nonexistent/tokenizer.json").find("/nonexistent/tokenizer.json"), std::string::npos);

  TempTokenizer wordpiece(R"({"model": {"type": "WordPiece", "vocab": {"a": 0}}})");
  std::string message = load_error(wordpiece.file());
  EXPECT_NE(message.find(wordpiece.file()), std::string::npos) << message;
  EXPECT_NE(message.find("WordPiece"), std::string::npos) << message;
  EXPECT_NE(message.find("supported"), std::string::npos) << message;

  TempTokenizer whitespace(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                               "pre_tokenizer": {"type": "Whitespace"}})");
  message = load_error(whitespace.file());
  EXPECT_NE(message.find(whitespace.file()), std::string::npos) << message;
  EXPECT_NE(message.find("Whitespace"), std::string::npos) << message;

  TempTokenizer broken("{not json");
  message = load_error(broken.file());
  EXPECT_NE(message.find(broken.file()), std::string::npos) << message;
}

// tokenizer.json is untrusted input: ids size tables, so one far beyond what the file holds must be
// an error naming it, not a std::bad_alloc; and nesting deep enough to overflow a recursive walk is
// refused before parsing.
TEST(Tokenizer, IdsBeyondTheFilesVocabularyAndDeepNestingAreErrors) {
  TempTokenizer huge(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1000000000}, "merges": []}})");
  std::string message = load_error(huge.file());
  EXPECT_NE(message.find(huge.file() + ": vocab token \"b\" has id 1000000000"), std::string::npos)
      << message;

  // Two entries and one added token: ids 0..2.
  TempTokenizer past(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 3}, "merges": []},
                         "added_tokens": [{"id": 2, "content": "<x>", "special": true}]})");
  message = load_error(past.file());
  EXPECT_NE(message.find("\"b\" has id 3, beyond the 3 ids"), std::string::npos) << message;

  TempTokenizer text_id(R"({"model": {"type": "BPE", "vocab": {"a": "0"}, "merges": []}})");
  message = load_error(text_id.file());
  EXPECT_NE(message.find("\"a\" has id \"0\", not an integer"), std::string::npos) << message;

  TempTokenizer special(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1000000000], "tokens": ["<s>"]}}}})");
  message = load_error(special.file());
  EXPECT_NE(message.find(special.file() + ": post_processor special token id 1000000000"), std::string::npos)
      << message;

  TempTokenizer deep(R"({"model": )" + std::string(100000, '[') + std::string(100000, ']') + "}");
  message = load_error(deep.file());
  EXPECT_NE(message.find(deep.file() + ": JSON nested deeper than 256 levels"), std::string::npos) << message;

  TempTokenizer deep_config(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  const std::string config = (deep_config.dir / "tokenizer_config.json").string();
  std::ofstream(config) << R"({"chat_template": )" << std::string(100000, '[') << std::string(100000, ']')
                        << "}";
  message = load_error(deep_config.file());
  EXPECT_NE(message.find(config + ": JSON nested deeper than 256 levels"), std::string::npos) << message;
}

// Reproduced with fuzz/tokenizer_json.cpp: an empty side of a merge was read before its start, and
// nlohmann converted 1e300 to an integer with undefined behaviour.
TEST(Tokenizer, EmptyMergeSidesAndNonIntegerNumbersAreErrors) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"("model": {"type": "BPE", "vocab": {"": 0, "b": 1}, "merges": [" b"]})",
       "merge 1 \" b\" has an empty token"},
      {R"("model": {"type": "BPE", "vocab": {"": 0, "b": 1}, "merges": [["b", ""]]})",
       "merge 1 \"b \" has an empty token"},
      {R"("model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "decoder": {"type": "Strip", "content": " ", "start": 1e300, "stop": 0})",
       "Strip decoder start 1e+300 is not an integer"},
      {R"("model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "decoder": {"type": "Strip", "content": " ", "start": 0, "stop": -1})",
       "Strip decoder stop -1 is not an integer"},
      {R"("model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}],
                             "special_tokens": {"<s>": {"ids": [1e300]}}})",
       "post_processor special token id 1e+300 is not an integer"},
      {R"("model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
          "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}],
                             "special_tokens": {"<s>": {"ids": 0}}})",
       "special token '<s>' has \"ids\" 0, not a list"},
  };
  for (const auto& [body, needle] : cases) {
    TempTokenizer tok("{" + body + "}");
    const std::string message = load_error(tok.file());
    EXPECT_NE(message.find(tok.file() + ": " + needle), std::string::npos) << message;
  }
}

// Found by fuzz/sentencepiece.cpp: a piece cut inside a UTF-8 sequence was decoded past its end.
TEST(Tokenizer, SentencePiecePiecesMustBeUtf8) {
  // ModelProto: pieces {piece, type}, trainer_spec {model_type: BPE}, normalizer_spec {name:
  // "identity", remove_extra_whitespaces: false}; every length here fits one byte.
  auto field = [](int number, const std::string& payload) {
    return std::string(1, static_cast<char>(number << 3 | 2)) + static_cast<char>(payload.size()) + payload;
  };
  auto piece = [&](const std::string& text, char type) { return field(1, field(1, text) + '\x18' + type); };
  const std::string pieces = piece("<unk>", 2) + piece("<s>", 3) + piece("</s>", 3) + piece("a", 1);
  const std::string specs =
      field(2, std::string("\x18\x02", 2)) + field(3, field(1, "identity") + std::string("\x20\x00", 2));
  TempTokenizer dir("{}");
  const std::string path = (dir.dir / "tokenizer.model").string();
  std::ofstream(path, std::ios::binary) << pieces + specs;
  EXPECT_EQ(load_tokenizer(path)->vocab_size(), 4);
  std::ofstream(path, std::ios::binary) << pieces + piece("nco\x96\x81\xe2", 1) + specs;
  const std::string message = load_error(path);
  EXPECT_NE(message.find(path + ": not a SentencePiece model (piece 4 is not valid UTF-8)"),
            std::string::npos)
      << message;
}

// Reproduced with fuzz/tokenizer_config.cpp: entries of other shapes threw nlohmann's exceptions.
TEST(Tokenizer, ChatTemplateListsHoldNamedTemplates) {
  TempTokenizer tok(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})");
  const std::string config = (tok.dir / "tokenizer_config.json").string();
  for (const char* bad : {R"([1])", R"([{"name": 5, "template": "x"}])", R"([{"name": "default"}])"}) {
    std::ofstream(config) << R"({"chat_template": )" << bad << "}";
    const std::string message = load_error(tok.file());
    EXPECT_NE(message.find(config + ": chat_template must be a string or a list"), std::string::npos)
        << bad << ": " << message;
  }
  std::ofstream(config) << R"({"chat_template": [{"name": "tool_use", "template": "x"},
                                                 {"name": "default", "template": "y"}]})";
  EXPECT_EQ(load_tokenizer(tok.file())->special().chat_template, "y");
}

TEST(Tokenizer, HandWrittenBpeMergesByRank) {
  // "a b" ranks before "b c": "abc" -> "ab" + "c", and "bc" alone merges.
  TempTokenizer tiny(R"({
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "<unk>": 5},
              "merges": [["a", "b"], ["b", "c"]], "unk_token": "<unk>", "fuse_unk": true},
    "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed"},
    "added_tokens": [{"id": 6, "content": "<x>", "special": true, "lstrip": true, "rstrip": true,
                      "single_word": false, "normalized": false}]})");
  auto tok = load_tokenizer(tiny.file());
  EXPECT_EQ(tok->encode("abc bc"), (std::vector<int32_t>{3, 2, 4}));
  EXPECT_EQ(tok->encode("zzab"), (std::vector<int32_t>{5, 3}));  // unknown characters fused
  EXPECT_EQ(tok->encode("a  <x>  b"), (std::vector<int32_t>{0, 6, 1}));
  EXPECT_EQ(tok->vocab_size(), 7);
  EXPECT_EQ(tok->decode({0, 6, 1}), "a <x> b");  // no decoder: tokens joined by spaces
  EXPECT_EQ(tok->decode({0, 6, 1}, true), "a b");
}

TEST(Tokenizer, InvalidUtf8IsReplacedNotRejected) {
  const Tokenizer& gpt2 = cached("gpt2");
  EXPECT_EQ(gpt2.encode("a\xFF"
                        "b"),
            gpt2.encode("a\xEF\xBF\xBD"
                        "b"));
}

TEST(Tokenizer, ThreadsGetTheSameIds) {
  const Tokenizer& tok = cached("llama3-style-bpe6k");
  std::vector<std::string> texts = corpus();
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& t : texts) expected.push_back(tok.encode(t));
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int round = 0; round < 5; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) bad[k] += tok.encode(texts[i]) != expected[i];
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad, std::vector<int>(4, 0));
}

#ifdef ALIGNER_BINARY
// Runs `aligner tokenize` on a JSONL file; returns its exit status and its stdout and stderr.
std::pair<int, std::string> tokenize_cli(const std::string& jsonl) {
  fs::path data = fs::temp_directory_path() / ("aligner_tokenize_" + std::to_string(::getpid()) + ".jsonl");
  std::ofstream(data) << jsonl;
  std::string command = std::string(ALIGNER_BINARY) + " tokenize --tokenizer " + (kDir / "gpt2").string() +
                        " --data " + data.string() + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  std::string output;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, n);
  int status = ::pclose(pipe);
  fs::remove(data);
  return {WEXITSTATUS(status), output};
}

TEST(TokenizeCommand, PrintsIdsPerLine) {
  auto [status, output] = tokenize_cli("{\"text\": \"Hello world\"}\n\n{\"text\": \"<|endoftext|>\"}\n");
  EXPECT_EQ(status, 0) << output;
  EXPECT_EQ(output, "{\"index\": 0, \"ids\": [15496, 995]}\n{\"index\": 1, \"ids\": [50256]}\n");
}

// {"a": {"a": ... 1}}, `depth` levels: nlohmann parses it, and its recursive copy or destruction
// would overflow the stack.
std::string deep_object(int depth) {
  std::string text;
  for (int i = 0; i < depth; ++i) text += "{\"a\": ";
  return text + "1" + std::string(depth, '}');
}

TEST(TokenizeCommand, BadLinesNameFileLineAndField) {
  auto [status, output] = tokenize_cli("{\"text\": \"ok\"}\n{\"txt\": \"no\"}\n");
  EXPECT_NE(status, 0);
  EXPECT_NE(output.find(".jsonl:2"), std::string::npos) << output;
  EXPECT_NE(output.find("\"text\""), std::string::npos) << output;

  std::tie(status, output) = tokenize_cli("{\"text\": \"ok\"}\n{broken\n");
  EXPECT_NE(status, 0);
  EXPECT_NE(output.find(".jsonl:2"), std::string::npos) << output;

  std::tie(status, output) = tokenize_cli("{\"text\": \"ok\"}\n{\"x\": " + deep_object(100000) + "}\n");
  EXPECT_EQ(status, 1) << output;
  EXPECT_NE(output.find(".jsonl:2: JSON nested deeper than 256 levels"), std::string::npos) << output;
}
#endif

TEST(Utf8, LossyReplacesMaximalSubparts) {
  EXPECT_EQ(utf8::lossy("ok"), "ok");
  EXPECT_EQ(utf8::lossy("\xE2\x82"
                        "A"),
            "\xEF\xBF\xBD"
            "A");                                                  // truncated 3-byte sequence: one
  EXPECT_EQ(utf8::lossy("\xC0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong: two
  EXPECT_EQ(utf8::lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: three
  EXPECT_EQ(utf8::lossy("\xF0\x9F\x98"), "\xEF\xBF\xBD");
  EXPECT_TRUE(utf8::is_valid("\xF0\x9F\x98\x80"));
  EXPECT_FALSE(utf8::is_valid("\xF4\x90\x80\x80"));
}

TEST(Regex, WhitespaceMeansOnigurumasWhiteSpace) {
  Regex spaces(R"(\s+)", "test");
  std::vector<std::pair<size_t, size_t>> matches;
  spaces.find_all(
      "a\xC2\x85"
      "b\xC2\xA0"
      "c",
      matches);  // U+0085 and U+00A0
  EXPECT_EQ(matches, (std::vector<std::pair<size_t, size_t>>{{1, 3}, {4, 6}}));

  Regex not_space(R"([^\s\p{L}]+)", "test");
  matches.clear();
  not_space.find_all(
      "x\xC2\x85"
      "1",
      matches);
  EXPECT_EQ(matches, (std::vector<std::pair<size_t, size_t>>{{3, 4}}));
  EXPECT_THROW(Regex("(unclosed", "test"), Error);
}

}  // namespace
}  // namespace aligner
