// What the tests share: scratch files and folders, the message of an expected error, a tokenizer
// whose ids read back as text, a small model with the project's real tokenizer, and running the
// aligner binary.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/hf_checkpoint.h"
#include "model/config.h"
#include "model/transformer.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"

namespace aligner::test {

inline const std::string kRoot = ALIGNER_SOURCE_DIR;

// The bytes a hex string spells ("89504e47" -> "\x89PNG"): binary fixtures written inline.
inline std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out += char(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

// An empty folder of its own under the system's temp folder.
inline std::filesystem::path temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("aligner_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// `content`, byte for byte, in a file of this process under the system's temp folder; its path.
inline std::string write_temp(const std::string& name, const std::string& content) {
  const auto path =
      std::filesystem::temp_directory_path() / ("aligner_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(path, std::ios::binary) << content;
  return path.string();
}

// The message of the aligner::Error that f throws; a test failure if it throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no aligner::Error thrown";
  return {};
}

// One id per byte, then one per special token, which is matched wherever the text writes it, as
// added tokens are. Decoding gives the text back, so what a mask covers can be checked as text.
class ByteTokenizer : public Tokenizer {
 public:
  ByteTokenizer(std::vector<std::string> specials, std::string bos, std::string eos,
                std::string chat_template = "")
      : specials_(std::move(specials)) {
    for (size_t i = 0; i < specials_.size(); ++i) ids_[specials_[i]] = 256 + static_cast<int32_t>(i);
    if (!bos.empty()) special_.bos = ids_.at(bos);
    if (!eos.empty()) special_.eos = ids_.at(eos);
    special_.bos_text = bos;
    special_.eos_text = eos;
    special_.chat_template = std::move(chat_template);
  }
  std::vector<int32_t> encode(std::string_view text, bool add_special) const override {
    std::vector<int32_t> out;
    if (add_special && special_.bos) out.push_back(*special_.bos);
    for (size_t i = 0; i < text.size();) {
      size_t best = 0;
      int32_t id = 0;
      for (const auto& [s, sid] : ids_) {
        if (s.size() > best && text.substr(i, s.size()) == s) best = s.size(), id = sid;
      }
      if (best) {
        out.push_back(id);
        i += best;
      } else {
        out.push_back(static_cast<unsigned char>(text[i++]));
      }
    }
    return out;
  }
  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::string out;
    for (int32_t id : ids) {
      if (id >= 256) {
        if (!skip_special) out += specials_.at(id - 256);
      } else {
        out += static_cast<char>(id);
      }
    }
    return out;
  }
  int64_t vocab_size() const override { return 256 + static_cast<int64_t>(specials_.size()); }
  std::optional<int32_t> token_to_id(std::string_view token) const override {
    auto it = ids_.find(std::string(token));
    if (it != ids_.end()) return it->second;
    if (token.size() == 1) return static_cast<unsigned char>(token[0]);
    return std::nullopt;
  }
  std::string id_to_token(int32_t id) const override {
    return id >= 256 ? specials_.at(id - 256) : std::string(1, static_cast<char>(id));
  }

 private:
  std::vector<std::string> specials_;
  std::map<std::string, int32_t> ids_;
};

// A small random Llama with the 6k BPE tokenizer (which has Llama 3's chat tokens), made once per
// test binary for each context length.
inline const std::string& tiny_model(int64_t max_position_embeddings = 512) {
  static std::map<int64_t, std::string> made;
  auto& dir = made[max_position_embeddings];
  if (dir.empty()) {
    const auto d = temp_dir("model_" + std::to_string(max_position_embeddings)) / "m";
    nlohmann::json j = {{"model_type", "llama"},       {"vocab_size", 6000},
                        {"hidden_size", 64},           {"intermediate_size", 128},
                        {"num_hidden_layers", 2},      {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},    {"max_position_embeddings", max_position_embeddings},
                        {"tie_word_embeddings", true}, {"torch_dtype", "float32"}};
    auto m = init_transformer(parse_model_config(j, "tiny"), at::kCPU, 42);
    save_transformer(m, d.string(), std::nullopt, 0, kRoot + "/tests/fixtures/tokenizers/llama3-style-bpe6k");
    dir = d.string();
  }
  return dir;
}

// The conversation without its last message: the prompt of its last reply.
inline Conversation prompt_of(Conversation c) {
  c.messages.pop_back();
  return c;
}

// The text of the trained-on tokens, in order.
inline std::string loss_text(const TokenizedText& t, const Tokenizer& tok) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < t.ids.size(); ++i)
    if (t.loss_mask[i]) ids.push_back(t.ids[i]);
  return tok.decode(ids, false);
}

struct Run {
  int status = -1;  // exit code, or 128 + signal
  std::string output;
};

// A shell command's exit status and its stdout and stderr together.
inline Run run_shell(const std::string& command) {
  const std::string cmd = command + " 2>&1";
  Run r;
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

// The aligner binary with `args` (and environment assignments `env`), single-threaded so that
// numbers are reproducible; stdout and stderr together.
inline Run run_aligner(const std::string& args, const std::string& env = "") {
  return run_shell("OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 " + env + " " + ALIGNER_BINARY + " " + args);
}

// `aligner ARGS` on two local data-parallel ranks (aligner launch), their rendezvous on a port of
// this process's own (port_base plus a number from its pid), so that test binaries running at
// once do not meet.
inline Run run_aligner_on_two_ranks(const std::string& args, int port_base) {
  return run_aligner("launch --nproc-per-node 2 --master-port " +
                     std::to_string(port_base + ::getpid() % 50) + " -- " + ALIGNER_BINARY + " " + args);
}

}  // namespace aligner::test
