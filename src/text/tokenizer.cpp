#include "text/tokenizer.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/json.h"
#include "text/bpe_tokenizer.h"
#include "text/clip_tokenizer.h"
#include "text/sentencepiece_tokenizer.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// bos_token and friends are written either as the token text or as an AddedToken object.
void resolve_special(const Tokenizer& tokenizer, const json& config, const fs::path& config_path,
                     const char* key, std::optional<int32_t>& id, std::string& text) {
  if (!config.contains(key)) return;
  const json& value = config[key];
  if (value.is_null()) {
    id.reset();
    text.clear();
    return;
  }
  if (value.is_object() && value.contains("content") && value["content"].is_string()) {
    text = value["content"].get<std::string>();
  } else if (value.is_string()) {
    text = value.get<std::string>();
  } else {
    fail("{}: {} must be a string or an object with \"content\"", config_path.string(), key);
  }
  id = tokenizer.token_to_id(text);
  if (!id) fail("{}: {} \"{}\" is not a token of the tokenizer", config_path.string(), key, text);
}

std::string chat_template(const json& config, const fs::path& config_path) {
  if (!config.contains("chat_template") || config["chat_template"].is_null()) {
    // Newer Hugging Face checkpoints keep the template in its own file.
    fs::path jinja = config_path.parent_path() / "chat_template.jinja";
    if (!fs::exists(jinja)) return {};
    std::ifstream in(jinja, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
  }
  const json& value = config["chat_template"];
  if (value.is_string()) return value.get<std::string>();
  if (value.is_array()) {
    // Checked before reading: value() and get() throw nlohmann's own exceptions on other shapes.
    const auto is_named_template = [](const json& named) {
      return named.is_object() && named.contains("name") && named["name"].is_string() &&
             named.contains("template") && named["template"].is_string();
    };
    if (std::all_of(value.begin(), value.end(), is_named_template)) {
      for (const json& named : value)
        if (named["name"] == "default") return named["template"].get<std::string>();
      return {};
    }
  }
  fail("{}: chat_template must be a string or a list of {{\"name\", \"template\"}}", config_path.string());
}

}  // namespace

void check_tokenizer_fits(const Tokenizer& tok, int64_t model_vocab, const std::string& dir) {
  if (tok.vocab_size() > model_vocab)
    fail("{}: the tokenizer has {} tokens but the model's vocabulary is {}", dir, tok.vocab_size(),
         model_vocab);
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  std::error_code error;
  fs::path file(path);
  if (!fs::exists(file, error)) fail("tokenizer {} does not exist", path);
  // Slow tokenizer files (vocab.json + merges.txt) only as CLIPTokenizer has them: Stable
  // Diffusion's tokenizer/ folder.
  bool clip_slow = false;
  if (fs::is_directory(file, error)) {
    if (fs::exists(file / "tokenizer.json", error)) {
      file /= "tokenizer.json";
    } else if (fs::exists(file / "tokenizer.model", error)) {
      file /= "tokenizer.model";
    } else if (fs::exists(file / "vocab.json", error) && fs::exists(file / "merges.txt", error)) {
      const fs::path config_path = file / "tokenizer_config.json";
      const json config =
          fs::exists(config_path, error) ? read_json_file(config_path.string()) : json::object();
      const std::string cls =
          config.is_object() && config.contains("tokenizer_class") && config["tokenizer_class"].is_string()
              ? config["tokenizer_class"].get<std::string>()
              : "";
      if (cls != "CLIPTokenizer" && cls != "CLIPTokenizerFast")
        fail(
            "{}: vocab.json and merges.txt are read only as CLIPTokenizer's (tokenizer_class is \"{}\"); "
            "other tokenizers need a tokenizer.json",
            path, cls);
      clip_slow = true;
      file /= "vocab.json";
    } else {
      fail("{}: folder has neither tokenizer.json nor tokenizer.model (nor CLIP's vocab.json and merges.txt)",
           path);
    }
  }

  std::unique_ptr<Tokenizer> tokenizer;
  if (clip_slow) {
    tokenizer = load_clip_tokenizer(file.parent_path().string());
  } else if (file.extension() == ".json") {
    tokenizer = load_bpe_tokenizer(file.string());
  } else if (file.extension() == ".model") {
    tokenizer = load_sentencepiece_tokenizer(file.string());
  } else {
    fail("{}: not a tokenizer (supported: a folder, a tokenizer.json, a SentencePiece .model)", path);
  }

  fs::path config_path = file.parent_path() / "tokenizer_config.json";
  if (fs::exists(config_path, error)) {
    json config = read_json_file(config_path.string());
    SpecialTokens& special = tokenizer->special_;
    resolve_special(*tokenizer, config, config_path, "bos_token", special.bos, special.bos_text);
    resolve_special(*tokenizer, config, config_path, "eos_token", special.eos, special.eos_text);
    resolve_special(*tokenizer, config, config_path, "pad_token", special.pad, special.pad_text);
    resolve_special(*tokenizer, config, config_path, "unk_token", special.unk, special.unk_text);
    special.chat_template = chat_template(config, config_path);
  }
  // transformers lets special_tokens_map.json override tokenizer_config.json. Read for CLIP's slow
  // files alone, which Stable Diffusion ships with both.
  const fs::path map_path = file.parent_path() / "special_tokens_map.json";
  if (clip_slow && fs::exists(map_path, error)) {
    json map = read_json_file(map_path.string());
    if (!map.is_object()) fail("{}: not a JSON object", map_path.string());
    SpecialTokens& special = tokenizer->special_;
    resolve_special(*tokenizer, map, map_path, "bos_token", special.bos, special.bos_text);
    resolve_special(*tokenizer, map, map_path, "eos_token", special.eos, special.eos_text);
    resolve_special(*tokenizer, map, map_path, "pad_token", special.pad, special.pad_text);
    resolve_special(*tokenizer, map, map_path, "unk_token", special.unk, special.unk_text);
  }
  return tokenizer;
}

}  // namespace aligner
