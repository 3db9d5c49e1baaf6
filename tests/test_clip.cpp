// CLIP: config parsing and its errors, loading and its shape checks, the tokenizers (slow files and
// tokenizer.json agree; parity with transformers' ids), the text and vision towers and the PickScore
// reward against transformers (tests/fixtures/clip-tiny, written by scripts/make_clip_fixture.py;
// those tests skip until it exists), and the reward's gradient against finite differences.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "core/json.h"
#include "diffusion/clip.h"
#include "io/safetensors.h"
#include "test_util.h"
#include "text/clip_tokenizer.h"
#include "text/tokenizer.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::error_of;
using test::temp_dir;

const fs::path kFixture = fs::path(ALIGNER_SOURCE_DIR) / "tests" / "fixtures" / "clip-tiny";

#define SKIP_WITHOUT_FIXTURE()                                                                         \
  if (!fs::exists(kFixture / "expected.safetensors"))                                                  \
  GTEST_SKIP() << kFixture.string() << " is missing: generate it on a machine with transformers with " \
               << "`python3 scripts/make_clip_fixture.py` from the repo root"

void write_json(const fs::path& path, const json& j) {
  std::ofstream(path) << j.dump(2);
}

// ---------------------------------------------------------------------------------------------
// Tokenizers

// GPT-2's byte -> character map, as CLIP's vocabulary spells bytes.
std::vector<std::string> byte_chars() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<std::string> chars(256);
  std::vector<bool> printable(256, false);
  for (int b : bs) printable[b] = true;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const uint32_t c = printable[b] ? b : 256 + extra++;
    std::string s;
    if (c < 0x80) {
      s += char(c);
    } else {
      s += char(0xC0 | (c >> 6));
      s += char(0x80 | (c & 0x3F));
    }
    chars[b] = s;
  }
  return chars;
}

// A tiny CLIP vocabulary as scripts/make_clip_fixture.py builds it: the bytes, the bytes ending a
// word, each word's byte-level spelling merged left to right, then the two special tokens. Writes
// Stable Diffusion's tokenizer/ files into `slow` and the tokenizer.json that transformers 5's
// CLIPTokenizer (or 4's CLIPConverter, without the special texts in its regex) makes into `fast`.
void write_tiny_tokenizer(const fs::path& slow, const fs::path& fast) {
  const auto chars = byte_chars();
  std::vector<std::string> vocab = chars;
  for (const auto& c : chars) vocab.push_back(c + "</w>");
  std::vector<std::pair<std::string, std::string>> merges;
  std::set<std::string> known(vocab.begin(), vocab.end());
  for (std::string word :
       {"a", "photo", "of", "cat", "horse", "the", "caf\xC3\xA9", "'s", "red", "mountain"}) {
    std::vector<std::string> symbols;
    for (unsigned char b : word) symbols.push_back(chars[b]);
    symbols.back() += "</w>";
    while (symbols.size() > 1) {
      const std::pair<std::string, std::string> pair{symbols[0], symbols[1]};
      if (std::find(merges.begin(), merges.end(), pair) == merges.end()) merges.push_back(pair);
      const std::string merged = pair.first + pair.second;
      if (known.insert(merged).second) vocab.push_back(merged);
      symbols.erase(symbols.begin());
      symbols[0] = merged;
    }
  }
  vocab.push_back("<|startoftext|>");
  vocab.push_back("<|endoftext|>");
  json v = json::object();
  for (size_t i = 0; i < vocab.size(); ++i) v[vocab[i]] = i;
  const int64_t bos = vocab.size() - 2, eos = vocab.size() - 1;

  fs::create_directories(slow);
  write_json(slow / "vocab.json", v);
  std::ofstream merges_file(slow / "merges.txt");
  merges_file << "#version: 0.2\n";
  for (const auto& [a, b] : merges) merges_file << a << ' ' << b << '\n';
  merges_file.close();
  write_json(slow / "tokenizer_config.json", {{"tokenizer_class", "CLIPTokenizer"},
                                              {"bos_token", "<|startoftext|>"},
                                              {"eos_token", "<|endoftext|>"},
                                              {"pad_token", "<|endoftext|>"},
                                              {"unk_token", "<|endoftext|>"},
                                              {"model_max_length", 77}});
  write_json(slow / "special_tokens_map.json", {{"pad_token", "<|endoftext|>"}});

  json merge_list = json::array();
  for (const auto& [a, b] : merges) merge_list.push_back(a + " " + b);
  const auto added = [](const char* content, int64_t id) {
    return json{{"id", id},        {"content", content}, {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", true}, {"special", true}};
  };
  const json tokenizer = {
      {"version", "1.0"},
      {"added_tokens", {added("<|startoftext|>", bos), added("<|endoftext|>", eos)}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "NFC"}},
          {{"type", "Replace"}, {"pattern", {{"Regex", "\\s+"}}}, {"content", " "}},
          {{"type", "Lowercase"}}}}}},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern",
            {{"Regex",
              "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}"
              "\\p{N}]+"}}},
           {"behavior", "Removed"},
           {"invert", true}},
          // use_regex left at true: GPT-2's split runs on each piece too, and changes none.
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}}}}}},
      {"post_processor",
       {{"type", "RobertaProcessing"},
        {"sep", {"<|endoftext|>", eos}},
        {"cls", {"<|startoftext|>", bos}},
        {"trim_offsets", false},
        {"add_prefix_space", false}}},
      {"decoder",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", "<|endoftext|>"},
        {"continuing_subword_prefix", ""},
        {"end_of_word_suffix", "</w>"},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"vocab", v},
        {"merges", merge_list}}},
  };
  fs::create_directories(fast);
  write_json(fast / "tokenizer.json", tokenizer);
  write_json(fast / "tokenizer_config.json", {{"bos_token", "<|startoftext|>"},
                                              {"eos_token", "<|endoftext|>"},
                                              {"pad_token", "<|endoftext|>"},
                                              {"unk_token", "<|endoftext|>"}});
}

struct TinyTokenizers {
  std::unique_ptr<Tokenizer> slow, fast;
};

const TinyTokenizers& tiny_tokenizers() {
  static const TinyTokenizers t = [] {
    const fs::path dir = temp_dir("clip_tokenizers");
    write_tiny_tokenizer(dir / "slow", dir / "fast");
    return TinyTokenizers{load_tokenizer((dir / "slow").string()), load_tokenizer((dir / "fast").string())};
  }();
  return t;
}

std::vector<int32_t> ids_of(const Tokenizer& tok, std::initializer_list<const char*> tokens) {
  std::vector<int32_t> ids;
  for (const char* t : tokens) ids.push_back(tok.token_to_id(t).value());
  return ids;
}

TEST(ClipTokenizer, WordsEndInSuffixAndMergeByRank) {
  for (const Tokenizer* tok : {tiny_tokenizers().slow.get(), tiny_tokenizers().fast.get()}) {
    EXPECT_EQ(tok->encode("A photo of the CAT", true),
              ids_of(*tok, {"<|startoftext|>", "a</w>", "photo</w>", "of</w>", "the</w>", "cat</w>",
                            "<|endoftext|>"}));
    // Letters without merges: single byte tokens, the last one a word end.
    EXPECT_EQ(tok->encode("xyz", false), ids_of(*tok, {"x", "y", "z</w>"}));
    // Merges join a word's symbols, not whole words: "ca t</w>" does not apply inside "cats".
    EXPECT_EQ(tok->encode("cats", false), ids_of(*tok, {"ca", "t", "s</w>"}));
    EXPECT_EQ(tok->encode("the horse's", false), ids_of(*tok, {"the</w>", "horse</w>", "'s</w>"}));
    EXPECT_EQ(tok->encode("3.14!!", false), ids_of(*tok, {"3</w>", ".</w>", "1</w>", "4</w>", "!", "!</w>"}));
    // NFC, whitespace and case do not matter.
    EXPECT_EQ(tok->encode("cafe\xCC\x81   \t\n RED", false), tok->encode("caf\xC3\xA9 red", false));
    EXPECT_EQ(tok->encode("  extra   spaces ", false), tok->encode("extra spaces", false));
    EXPECT_EQ(tok->encode("\xC3\x89", false), tok->encode("\xC3\xA9", false));  // É lowercased
    // Special tokens written in the text.
    EXPECT_EQ(tok->encode("a<|endoftext|>of", false), ids_of(*tok, {"a</w>", "<|endoftext|>", "of</w>"}));
    EXPECT_EQ(tok->encode("", true), ids_of(*tok, {"<|startoftext|>", "<|endoftext|>"}));
    EXPECT_EQ(tok->decode(tok->encode("A photo of the cat's caf\xC3\xA9", true), true),
              "a photo of the cat 's caf\xC3\xA9");
  }
  const Tokenizer& slow = *tiny_tokenizers().slow;
  EXPECT_EQ(slow.special().bos, slow.token_to_id("<|startoftext|>"));
  EXPECT_EQ(slow.special().pad, slow.token_to_id("<|endoftext|>"));
}

TEST(ClipTokenizer, SlowFilesCleanTextAsBasicTokenizer) {
  const Tokenizer& slow = *tiny_tokenizers().slow;
  const Tokenizer& fast = *tiny_tokenizers().fast;
  // Format characters (a zero-width joiner) and controls are dropped by the slow rules only.
  EXPECT_EQ(slow.encode("ph\xE2\x80\x8Doto", false), slow.encode("photo", false));
  EXPECT_NE(fast.encode("ph\xE2\x80\x8Doto", false), fast.encode("photo", false));
  EXPECT_EQ(slow.encode("ph\x07oto", false), slow.encode("photo", false));
  // CJK ideographs become words of their own.
  EXPECT_EQ(slow.encode("a\xE4\xB8\xAD"
                        "a",
                        false),
            slow.encode("a \xE4\xB8\xAD a", false));
  EXPECT_NE(fast.encode("a\xE4\xB8\xAD"
                        "a",
                        false),
            fast.encode("a \xE4\xB8\xAD a", false));
}

TEST(ClipTokenizer, PaddedAndTruncatedAsStableDiffusionPipelines) {
  const Tokenizer& tok = *tiny_tokenizers().slow;
  const int32_t bos = *tok.special().bos, eos = *tok.special().eos;
  const auto short_ids = encode_padded(tok, "a cat", 77);
  ASSERT_EQ(short_ids.size(), 77u);
  EXPECT_EQ(std::vector<int32_t>(short_ids.begin(), short_ids.begin() + 4),
            ids_of(tok, {"<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"}));
  EXPECT_TRUE(std::all_of(short_ids.begin() + 4, short_ids.end(), [&](int32_t id) { return id == eos; }));
  std::string long_text;
  for (int i = 0; i < 50; ++i) long_text += "a photo ";
  const auto long_ids = encode_padded(tok, long_text, 77);
  ASSERT_EQ(long_ids.size(), 77u);
  EXPECT_EQ(long_ids.front(), bos);
  EXPECT_EQ(long_ids.back(), eos);
  EXPECT_EQ(long_ids[74], *tok.token_to_id("photo</w>"));
  EXPECT_EQ(long_ids[75], *tok.token_to_id("a</w>"));
  const at::Tensor batch = clip_input_ids(tok, {"a cat", long_text}, 77);
  EXPECT_EQ(batch.sizes(), (std::vector<int64_t>{2, 77}));
  EXPECT_EQ(batch[1][74].item<int64_t>(), long_ids[74]);
  EXPECT_NE(error_of([&] { encode_padded(tok, "a", 1); }).find("max_length 1"), std::string::npos);
}

TEST(ClipTokenizer, SlowFilesOfOtherTokenizersAreRefused) {
  const fs::path dir = temp_dir("clip_gpt2_slow");
  write_tiny_tokenizer(dir, dir / "unused");
  write_json(dir / "tokenizer_config.json", {{"tokenizer_class", "GPT2Tokenizer"}});
  const std::string message = error_of([&] { load_tokenizer(dir.string()); });
  EXPECT_NE(message.find(dir.string()), std::string::npos) << message;
  EXPECT_NE(message.find("GPT2Tokenizer"), std::string::npos) << message;
}

TEST(ClipTokenizer, MatchesTransformers) {
  SKIP_WITHOUT_FIXTURE();
  const json cases = read_json_file((kFixture / "tokenizer_cases.json").string());
  const auto slow = load_tokenizer((kFixture / "tokenizer").string());
  const auto fast = load_tokenizer(kFixture.string());
  // Under transformers 5 CLIPTokenizer runs the tokenizers pipeline: its ids for the cases where
  // transformers 4's Python rules differ are not what aligner's slow loader (those rules) gives.
  const bool python_slow = cases.at("slow_backend") == "python";
  int compared = 0;
  for (const json& c : cases.at("cases")) {
    const std::string text = c.at("text");
    EXPECT_EQ(fast->encode(text, true), c.at("fast").get<std::vector<int32_t>>()) << "fast: " << c.dump();
    if (python_slow || !c.at("v4_only").get<bool>()) {
      EXPECT_EQ(slow->encode(text, true), c.at("slow").get<std::vector<int32_t>>()) << "slow: " << c.dump();
      ++compared;
    }
  }
  EXPECT_GE(compared, 10);
  safetensors::File expected = safetensors::File::open((kFixture / "expected.safetensors").string());
  const auto captions = cases.at("captions").get<std::vector<std::string>>();
  EXPECT_TRUE(at::equal(clip_input_ids(*slow, captions, 77), expected.get("input_ids")));
  EXPECT_TRUE(at::equal(clip_input_ids(*fast, captions, 77), expected.get("input_ids")));
}

// ---------------------------------------------------------------------------------------------
// Configs

std::string config_error(const json& config) {
  const std::string path = test::write_temp("clip_config.json", config.dump());
  const std::string message = error_of([&] { load_clip_config(path); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  return message;
}

TEST(ClipConfig, DefaultsAreTransformers) {
  const std::string path = test::write_temp("clip_defaults.json", R"({"model_type": "clip_text_model"})");
  const ClipConfig c = load_clip_config(path);
  EXPECT_EQ(c.text.vocab_size, 49408);
  EXPECT_EQ(c.text.hidden_size, 512);
  EXPECT_EQ(c.text.intermediate_size, 2048);
  EXPECT_EQ(c.text.num_hidden_layers, 12);
  EXPECT_EQ(c.text.num_attention_heads, 8);
  EXPECT_EQ(c.text.max_position_embeddings, 77);
  EXPECT_EQ(c.text.hidden_act, "quick_gelu");
  EXPECT_EQ(c.text.eos_token_id, 49407);
  EXPECT_FALSE(c.has_vision);
  EXPECT_FALSE(c.has_text_projection);

  const std::string clip = test::write_temp(
      "clip_model.json",
      R"({"model_type": "clip", "projection_dim": 768, "text_config": {"hidden_size": 768, "num_attention_heads": 12},
          "vision_config_dict": {"patch_size": 14}, "torch_dtype": "bfloat16"})");
  const ClipConfig m = load_clip_config(clip);
  EXPECT_TRUE(m.has_vision && m.has_text_projection);
  EXPECT_EQ(m.text.projection_dim, 768);
  EXPECT_EQ(m.vision.projection_dim, 768);
  EXPECT_EQ(m.vision.patch_size, 14);
  EXPECT_EQ(m.vision.image_size, 224);
  EXPECT_EQ(m.vision.hidden_size, 768);
  EXPECT_EQ(m.dtype, at::kBFloat16);
}

TEST(ClipConfig, BadValuesNameTheKey) {
  EXPECT_NE(config_error({{"model_type", "clip_text_model"}, {"hidden_size", 0}}).find("hidden_size"),
            std::string::npos);
  EXPECT_NE(config_error({{"model_type", "clip_text_model"}, {"num_attention_heads", 5}})
                .find("num_attention_heads 5"),
            std::string::npos);
  EXPECT_NE(config_error({{"model_type", "clip_text_model"}, {"hidden_act", "relu"}}).find("hidden_act"),
            std::string::npos);
  EXPECT_NE(config_error({{"model_type", "clip"}, {"vision_config", {{"patch_size", -1}}}})
                .find("vision_config.patch_size"),
            std::string::npos);
  EXPECT_NE(config_error({{"model_type", "clip"}, {"text_config", {{"layer_norm_eps", "x"}}}})
                .find("text_config.layer_norm_eps"),
            std::string::npos);
  EXPECT_NE(config_error({{"model_type", "llama"}}).find("model_type"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Models

// A random CLIPModel (or text-only folder) small enough for finite differences.
struct TinySpec {
  std::string model_type = "clip";
  int64_t vocab = 20, hidden = 8, heads = 2, inter = 12, layers = 2, max_pos = 9, projection = 6;
  int64_t v_hidden = 8, v_heads = 2, v_inter = 10, image = 8, patch = 4;
  int64_t eos = 19;
  std::string text_act = "quick_gelu", vision_act = "gelu";
};

void write_tiny_model(const fs::path& dir, const TinySpec& s, uint64_t seed) {
  fs::create_directories(dir);
  json text = {{"vocab_size", s.vocab},
               {"hidden_size", s.hidden},
               {"num_attention_heads", s.heads},
               {"intermediate_size", s.inter},
               {"num_hidden_layers", s.layers},
               {"max_position_embeddings", s.max_pos},
               {"hidden_act", s.text_act},
               {"eos_token_id", s.eos},
               {"bos_token_id", 0},
               {"projection_dim", s.projection}};
  json config;
  if (s.model_type == "clip") {
    config = {{"model_type", "clip"},
              {"projection_dim", s.projection},
              {"text_config", text},
              {"vision_config",
               {{"hidden_size", s.v_hidden},
                {"num_attention_heads", s.v_heads},
                {"intermediate_size", s.v_inter},
                {"num_hidden_layers", s.layers},
                {"image_size", s.image},
                {"patch_size", s.patch},
                {"hidden_act", s.vision_act}}}};
  } else {
    config = text;
    config["model_type"] = "clip_text_model";
    config["architectures"] = {"CLIPTextModel"};
  }
  write_json(dir / "config.json", config);

  at::manual_seed(seed);
  safetensors::NamedTensors t;
  const auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    t.emplace_back(
        name,
        at::randn(shape) * 0.5 +
            (name.find("norm") != std::string::npos && name.find("weight") != std::string::npos ? 1.0 : 0.0));
  };
  const auto encoder = [&](const std::string& prefix, int64_t h, int64_t inter) {
    for (int64_t i = 0; i < s.layers; ++i) {
      const std::string p = prefix + ".encoder.layers." + std::to_string(i) + ".";
      for (const char* n : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
        add(p + "self_attn." + n + ".weight", {h, h});
        add(p + "self_attn." + n + ".bias", {h});
      }
      for (const char* n : {"layer_norm1", "layer_norm2"}) {
        add(p + n + ".weight", {h});
        add(p + n + ".bias", {h});
      }
      add(p + "mlp.fc1.weight", {inter, h});
      add(p + "mlp.fc1.bias", {inter});
      add(p + "mlp.fc2.weight", {h, inter});
      add(p + "mlp.fc2.bias", {h});
    }
  };
  add("text_model.embeddings.token_embedding.weight", {s.vocab, s.hidden});
  add("text_model.embeddings.position_embedding.weight", {s.max_pos, s.hidden});
  encoder("text_model", s.hidden, s.inter);
  add("text_model.final_layer_norm.weight", {s.hidden});
  add("text_model.final_layer_norm.bias", {s.hidden});
  if (s.model_type == "clip") {
    const int64_t positions = (s.image / s.patch) * (s.image / s.patch) + 1;
    add("text_projection.weight", {s.projection, s.hidden});
    add("vision_model.embeddings.class_embedding", {s.v_hidden});
    add("vision_model.embeddings.patch_embedding.weight", {s.v_hidden, 3, s.patch, s.patch});
    add("vision_model.embeddings.position_embedding.weight", {positions, s.v_hidden});
    add("vision_model.pre_layrnorm.weight", {s.v_hidden});
    add("vision_model.pre_layrnorm.bias", {s.v_hidden});
    encoder("vision_model", s.v_hidden, s.v_inter);
    add("vision_model.post_layernorm.weight", {s.v_hidden});
    add("vision_model.post_layernorm.bias", {s.v_hidden});
    add("visual_projection.weight", {s.projection, s.v_hidden});
    t.emplace_back("logit_scale", at::full({}, 2.6592));
  }
  safetensors::save((dir / "model.safetensors").string(), t);
}

// A copy of the folder whose tensor `name` is replaced by `value` (added if it has none; left out
// when value is undefined).
fs::path tampered(const fs::path& from, const std::string& tag, const std::string& name,
                  const at::Tensor& value) {
  const fs::path dir = temp_dir("clip_tampered_" + tag);
  fs::copy_file(from / "config.json", dir / "config.json");
  const auto file = safetensors::File::open((from / "model.safetensors").string());
  safetensors::NamedTensors t;
  for (const auto& info : file.tensors())
    if (info.name != name) t.emplace_back(info.name, file.get(info.name));
  if (value.defined()) t.emplace_back(name, value);
  safetensors::save((dir / "model.safetensors").string(), t);
  return dir;
}

TEST(ClipModel, MissingOrMisshapenTensorsNameTheFolderAndTensor) {
  const fs::path dir = temp_dir("clip_shapes");
  write_tiny_model(dir, TinySpec{}, 1);
  EXPECT_NO_THROW(load_clip_model(dir.string(), at::kCPU));

  const std::string name = "text_model.encoder.layers.1.mlp.fc1.weight";
  const fs::path bad = tampered(dir, "shape", name, at::zeros({12, 9}));
  std::string message = error_of([&] { load_clip_model(bad.string(), at::kCPU); });
  EXPECT_NE(message.find(bad.string()), std::string::npos) << message;
  EXPECT_NE(message.find(name), std::string::npos) << message;
  EXPECT_NE(message.find("[12, 9]"), std::string::npos) << message;

  const fs::path missing = tampered(dir, "missing", "logit_scale", at::Tensor());
  message = error_of([&] { load_clip_model(missing.string(), at::kCPU); });
  EXPECT_NE(message.find("missing tensor 'logit_scale'"), std::string::npos) << message;

  const fs::path extra = tampered(dir, "extra", "text_model.encoder.layers.2.mlp.fc1.weight", at::zeros({1}));
  message = error_of([&] { load_clip_model(extra.string(), at::kCPU); });
  EXPECT_NE(message.find("unexpected tensor 'text_model.encoder.layers.2.mlp.fc1.weight'"), std::string::npos)
      << message;
}

TEST(ClipModel, TextPoolingPicksTheEosAsTransformers) {
  for (int64_t eos : {int64_t{2}, int64_t{7}}) {
    TinySpec spec;
    spec.model_type = "clip_text_model";
    spec.eos = eos;
    const fs::path dir = temp_dir("clip_pool_" + std::to_string(eos));
    write_tiny_model(dir, spec, 2);
    const ClipModel m = load_clip_model(dir.string(), at::kCPU);
    EXPECT_FALSE(m.cfg.has_vision);
    const at::Tensor ids = at::tensor({0, 5, 7, 19, 7, 3, 0, 4, 5, 6, 1, 2}, at::kLong).view({2, 6});
    const ClipTextOutput out = clip_text_forward(m.text, ids);
    // Legacy (eos 2): the largest id (19 at 3; 6 at 3); else the first eos (7 at 2; none: 0).
    const std::vector<int64_t> picked = eos == 2 ? std::vector<int64_t>{3, 3} : std::vector<int64_t>{2, 0};
    for (int64_t b = 0; b < 2; ++b)
      EXPECT_TRUE(at::equal(out.pooled[b], out.last_hidden_state[b][picked[b]])) << eos << " row " << b;
    EXPECT_NE(error_of([&] { clip_text_embeds(m.text, out); }).find("text_projection"), std::string::npos);
    // Causal: a token's state does not depend on later tokens.
    const at::Tensor changed = ids.clone();
    changed[0][5] = 9;
    const at::Tensor again = clip_text_forward(m.text, changed).last_hidden_state;
    EXPECT_TRUE(at::allclose(again.slice(1, 0, 5), out.last_hidden_state.slice(1, 0, 5)));
    EXPECT_NE(error_of([&] {
                clip_text_forward(m.text, at::full({1, 3}, 20, at::kLong));
              }).find("vocabulary"),
              std::string::npos);
  }
}

TEST(ClipModel, ScoreGradientMatchesFiniteDifferences) {
  const fs::path dir = temp_dir("clip_grad");
  write_tiny_model(dir, TinySpec{}, 3);
  const ClipModel m = load_clip_model(dir.string(), at::kCPU, at::kDouble);
  at::manual_seed(4);
  // Not square and larger than image_size: the bicubic resize and the crop are in the path.
  const at::Tensor images = at::rand({2, 3, 11, 13}, at::kDouble).requires_grad_(true);
  const at::Tensor ids = at::tensor({0, 4, 9, 19, 19, 0, 3, 3, 12, 19}, at::kLong).view({2, 5});
  const at::Tensor score = clip_score(m, images, ids);
  ASSERT_EQ(score.sizes(), (std::vector<int64_t>{2}));
  const at::Tensor weights = at::tensor({0.7, -1.3}, at::kDouble);
  (score * weights).sum().backward();
  const at::Tensor grad = images.grad();
  ASSERT_TRUE(at::isfinite(grad).all().item<bool>());
  ASSERT_GT(grad.abs().max().item<double>(), 1e-6);

  at::NoGradGuard no_grad;
  const auto flat = images.detach().clone().view({-1});
  const int64_t n = flat.numel();
  std::mt19937 rng(5);
  for (int k = 0; k < 12; ++k) {
    const int64_t i = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
    const double h = 1e-5, x = flat[i].item<double>();
    flat[i] = x + h;
    const double up = (clip_score(m, flat.view(images.sizes()), ids) * weights).sum().item<double>();
    flat[i] = x - h;
    const double down = (clip_score(m, flat.view(images.sizes()), ids) * weights).sum().item<double>();
    flat[i] = x;
    const double numeric = (up - down) / (2 * h);
    EXPECT_NEAR(grad.view({-1})[i].item<double>(), numeric, 1e-6 + 1e-5 * std::abs(numeric))
        << "element " << i;
  }
  // One prompt for every image scores as the prompt repeated.
  const at::Tensor one = clip_score(m, images.detach(), ids.slice(0, 0, 1));
  const at::Tensor repeated = clip_score(m, images.detach(), ids.slice(0, 0, 1).repeat({2, 1}));
  EXPECT_TRUE(at::allclose(one, repeated));
}

void expect_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const double diff = (actual.to(at::kFloat) - expected.to(at::kFloat)).abs().max().item<double>();
  EXPECT_LT(diff, 1e-4) << what;
}

TEST(ClipModel, MatchesTransformers) {
  SKIP_WITHOUT_FIXTURE();
  at::NoGradGuard no_grad;
  const auto e = safetensors::File::open((kFixture / "expected.safetensors").string());
  const ClipModel m = load_clip_model(kFixture.string(), at::kCPU);
  const at::Tensor ids = e.get("input_ids"), mask = e.get("attention_mask");

  const ClipTextOutput text = clip_text_forward(m.text, ids);
  expect_close(text.last_hidden_state, e.get("text_last_hidden_state"), "text last_hidden_state");
  expect_close(text.pooled, e.get("text_pooled"), "text pooled");
  expect_close(clip_text_embeds(m.text, text), e.get("text_embeds"), "text_embeds");
  const ClipTextOutput masked = clip_text_forward(m.text, ids, mask);
  expect_close(masked.last_hidden_state, e.get("text_last_hidden_state_masked"), "masked last_hidden_state");
  expect_close(masked.pooled, e.get("text_pooled_masked"), "masked pooled");

  const ClipVisionOutput vision = clip_vision_forward(m.vision, e.get("pixel_values"));
  expect_close(vision.last_hidden_state, e.get("vision_last_hidden_state"), "vision last_hidden_state");
  expect_close(vision.pooled, e.get("vision_pooled"), "vision pooled");
  expect_close(clip_image_embeds(m.vision, vision), e.get("image_embeds"), "image_embeds");
  expect_close(clip_logits_per_image(m, e.get("pixel_values"), ids), e.get("logits_per_image"), "logits");

  expect_close(clip_preprocess(e.get("preprocess_images"), 32), e.get("preprocess_pixels"), "preprocess");
  expect_close(clip_score(m, e.get("preprocess_images"), ids.slice(0, 0, 2)), e.get("clip_scores"),
               "clip_score");

  const ClipModel legacy = load_clip_model((kFixture / "text_encoder").string(), at::kCPU);
  EXPECT_EQ(legacy.cfg.text.eos_token_id, 2);
  expect_close(clip_text_forward(legacy.text, ids).pooled, e.get("legacy_text_pooled"), "legacy pooled");
}

}  // namespace
}  // namespace aligner
