// connect_reward_server (reward.h): the client side of `aligner serve-reward`'s protocol
// (reward_server.h, README.md "Reward server API").
#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "io/http_client.h"
#include "reward/reward.h"
#include "reward/reward_model.h"

namespace aligner {
namespace {

// Texts may end inside a character (a response cut at a token limit); JSON needs UTF-8.
std::string json_string(const std::string& s) {
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

class ServerReward final : public Reward {
 public:
  ServerReward(const std::string& url, const HttpUrl& a, double timeout_s)
      : url_(url), client_(a, url, "the reward server", timeout_s) {}

  // The server's /health answer, checked.
  nlohmann::json health() {
    const nlohmann::json h = client_.get("/health", "/health");
    if (!h.is_object() || !h.contains("status") || h["status"] != "ok" || !h.contains("tokenizer") ||
        !h["tokenizer"].is_string())
      fail("{}/health: not an aligner reward server's answer: {}", url_, h.dump());
    if (h.contains("max_request_sequences") && h["max_request_sequences"].is_number_integer())
      max_sequences_ = std::max<int64_t>(1, h["max_request_sequences"].get<int64_t>());
    if (h.contains("max_request_bytes") && h["max_request_bytes"].is_number_integer())
      max_bytes_ = std::max<int64_t>(1, h["max_request_bytes"].get<int64_t>());
    return h;
  }

  void send_ids(bool on) { send_ids_ = on; }

  std::vector<double> score(const std::vector<RewardQuery>& queries) override {
    std::vector<double> rewards;
    rewards.reserve(queries.size());
    // Requests as large as the server takes, each item serialised once.
    std::vector<std::string> first, second;
    int64_t bytes = 0;
    size_t begin = 0;
    auto flush = [&] {
      if (first.empty()) return;
      const std::string body =
          send_ids_ ? "{\"input_ids\":[" + join(first) + "]}"
                    : "{\"prompts\":[" + join(first) + "],\"responses\":[" + join(second) + "]}";
      const size_t n = first.size();
      const nlohmann::json answer =
          client_.post("/score", body, fmt::format("/score (queries {} to {})", begin, begin + n - 1));
      if (!answer.is_object() || !answer.contains("rewards") || !answer["rewards"].is_array() ||
          answer["rewards"].size() != n)
        fail("{}/score: expected {{\"rewards\": [{} numbers]}}, got {}", url_, n,
             answer.dump().substr(0, 200));
      for (const auto& r : answer["rewards"]) {
        if (!r.is_number()) fail("{}/score: a reward is not a number: {}", url_, r.dump());
        rewards.push_back(r.get<double>());
      }
      begin += n;
      first.clear();
      second.clear();
      bytes = 0;
    };
    for (size_t i = 0; i < queries.size(); ++i) {
      const RewardQuery& q = queries[i];
      std::string a, b;
      if (send_ids_) {
        std::vector<int32_t> ids = q.prompt;
        ids.insert(ids.end(), q.response.begin(), q.response.end());
        if (ids.empty()) fail("reward query {}: nothing to score (no prompt or response tokens)", i);
        a = nlohmann::json(ids).dump();
      } else {
        a = json_string(q.prompt_text);
        b = json_string(q.response_text);
      }
      const int64_t item = int64_t(a.size() + b.size()) + 2;  // and the commas
      constexpr int64_t kEnvelope = 64;
      if (kEnvelope + item > max_bytes_)
        fail("reward query {}: {} bytes of JSON, more than {} takes in one request ({} bytes)", i, item, url_,
             max_bytes_);
      if (int64_t(first.size()) == max_sequences_ || kEnvelope + bytes + item > max_bytes_) flush();
      first.push_back(std::move(a));
      second.push_back(std::move(b));
      bytes += item;
    }
    flush();
    return rewards;
  }

 private:
  static std::string join(const std::vector<std::string>& items) {
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += ',';
      out += items[i];
    }
    return out;
  }

  std::string url_;
  JsonHttpClient client_;
  bool send_ids_ = false;
  int64_t max_sequences_ = 1024, max_bytes_ = int64_t(8) << 20;  // what an older server is assumed to take
};

}  // namespace

std::unique_ptr<Reward> connect_reward_server(const std::string& url, const Tokenizer& actor_tokenizer,
                                              double timeout_s) {
  if (!(timeout_s > 0 && timeout_s <= 1e6))
    fail("reward server timeout must be positive and at most 1e6 (seconds), got {}", timeout_s);
  const HttpUrl a = parse_http_url(url, "reward server url", false);
  // The url as given, without a trailing "/", so that paths read naturally after it in messages.
  const std::string base = url.back() == '/' ? url.substr(0, url.size() - 1) : url;
  auto reward = std::make_unique<ServerReward>(base, a, timeout_s);
  const nlohmann::json h = reward->health();
  const bool same = h["tokenizer"].get<std::string>() == tokenizer_fingerprint(actor_tokenizer);
  reward->send_ids(same);
  log_info("reward server {}: {}, {}", base,
           h.contains("model") && h["model"].is_string() ? h["model"].get<std::string>() : "a reward model",
           same ? "the actor's tokenizer: token ids are sent as generated"
                : "a tokenizer other than the actor's: prompt and response texts are sent");
  return reward;
}

}  // namespace aligner
