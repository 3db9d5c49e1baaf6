#include "reward/reward_server.h"

#include <c10/util/Exception.h>
#include <httplib.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/json.h"
#include "core/log.h"
#include "io/jsonl.h"

namespace aligner {
namespace {

constexpr const char* kBody = "request body";
constexpr auto kLogInterval = std::chrono::seconds(60);

// One request's sequences waiting for the worker, and where their scores go.
struct Job {
  std::vector<std::vector<int32_t>> seqs;
  int64_t tokens = 0;  // as scored: no more than the model's context each
  std::promise<RewardScores> done;
};

void reply(httplib::Response& res, int status, const nlohmann::ordered_json& body) {
  res.status = status;
  // A path or message may quote bytes that are not UTF-8; they must not make the answer throw.
  res.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), "application/json");
}

void reply_error(httplib::Response& res, int status, const std::string& message) {
  reply(res, status, {{"error", message}});
}

void check_list(const nlohmann::json& list, const char* name, const RewardServerOptions& opt) {
  if (!list.is_array()) fail("{}: field \"{}\": expected a list, got {}", kBody, name, json_type_name(list));
  if (int64_t(list.size()) > opt.max_request_sequences)
    fail("{}: field \"{}\": {} sequences, more than server.max_request_sequences ({})", kBody, name,
         list.size(), opt.max_request_sequences);
}

}  // namespace

std::vector<std::vector<int32_t>> parse_score_request(const std::string& body, const RewardScorer& s,
                                                      const RewardServerOptions& opt) {
  const nlohmann::json r = parse_json(body, kBody);
  if (!r.is_object())
    fail("{}: expected an object with \"input_ids\", or \"prompts\" and \"responses\", got {}", kBody,
         json_type_name(r));
  for (auto it = r.begin(); it != r.end(); ++it)
    if (it.key() != "input_ids" && it.key() != "prompts" && it.key() != "responses")
      fail("{}: unknown field \"{}\" (expected \"input_ids\", or \"prompts\" and \"responses\")", kBody,
           it.key());
  std::vector<std::vector<int32_t>> seqs;
  if (r.contains("input_ids")) {
    if (r.size() > 1) fail("{}: give \"input_ids\" or \"prompts\" and \"responses\", not both", kBody);
    const auto& list = r["input_ids"];
    check_list(list, "input_ids", opt);
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string name = fmt::format("input_ids[{}]", i);
      seqs.push_back(parse_token_ids(list[i], kBody, name, s.model.cfg.vocab_size));
      if (seqs.back().empty()) fail("{}: field \"{}\": empty sequence", kBody, name);
    }
    return seqs;
  }
  if (!r.contains("prompts") || !r.contains("responses"))
    fail("{}: expected a field \"input_ids\", or both \"prompts\" and \"responses\"", kBody);
  const auto &prompts = r["prompts"], &responses = r["responses"];
  check_list(prompts, "prompts", opt);
  check_list(responses, "responses", opt);
  if (prompts.size() != responses.size())
    fail("{}: field \"responses\": {} responses for {} prompts", kBody, responses.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto prompt = json_as<std::string>(prompts[i], kBody, fmt::format("prompts[{}]", i));
    const auto response = json_as<std::string>(responses[i], kBody, fmt::format("responses[{}]", i));
    seqs.push_back(encode_for_scoring(s, prompt, response));
    if (seqs.back().empty()) fail("{}: prompts[{}] and responses[{}] encode to no tokens", kBody, i, i);
  }
  return seqs;
}

struct RewardServer::State {
  std::unique_ptr<RewardScorer> scorer;
  RewardServerOptions opt;
  httplib::Server http;
  std::thread listener, worker;
  int port = -1;

  std::mutex mutex;  // guards queue and stopping
  std::condition_variable wake;
  std::deque<std::shared_ptr<Job>> queue;
  bool stopping = false;

  std::atomic<int64_t> rejected{0};  // 4xx answers since the last count was logged
  int64_t served = 0, scored = 0;    // the worker's, since the last count was logged
  std::chrono::steady_clock::time_point last_log = std::chrono::steady_clock::now();

  void handle_health(httplib::Response& res) const {
    const ModelConfig& c = scorer->model.cfg;
    reply(res, 200,
          {{"status", "ok"},
           {"model", scorer->path},
           {"num_labels", c.num_labels},
           {"labels", c.labels},
           {"vocab_size", c.vocab_size},
           {"max_length", c.max_position_embeddings},
           {"tokenizer", scorer->fingerprint},
           {"max_request_sequences", opt.max_request_sequences},
           {"max_request_bytes", opt.max_request_bytes}});
  }

  void handle_score(const httplib::Request& req, httplib::Response& res) {
    std::vector<std::vector<int32_t>> seqs;
    try {
      seqs = parse_score_request(req.body, *scorer, opt);
    } catch (const Error& e) {
      ++rejected;
      return reply_error(res, 400, e.what());
    }
    RewardScores scores;
    if (!seqs.empty()) scores = submit(std::move(seqs)).get();
    nlohmann::ordered_json out = {{"rewards", scores.rewards}};
    if (scorer->weights.size() > 1) out["scores"] = scores.outputs;
    reply(res, 200, out);
  }

  std::future<RewardScores> submit(std::vector<std::vector<int32_t>> seqs) {
    auto job = std::make_shared<Job>();
    for (const auto& ids : seqs)
      job->tokens += std::min<int64_t>(int64_t(ids.size()), scorer->model.cfg.max_position_embeddings);
    job->seqs = std::move(seqs);
    auto done = job->done.get_future();
    {
      std::lock_guard<std::mutex> lock(mutex);
      queue.push_back(std::move(job));
    }
    wake.notify_one();
    return done;
  }

  // The worker: the only thread that runs the model. It takes what is queued, up to the token
  // budget, so that requests that came in together share forward passes. It leaves once stopping
  // and nothing is queued.
  void work() {
    for (;;) {
      std::vector<std::shared_ptr<Job>> jobs;
      {
        std::unique_lock<std::mutex> lock(mutex);
        wake.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        int64_t tokens = 0;
        while (!queue.empty() &&
               (jobs.empty() || tokens + queue.front()->tokens <= opt.max_tokens_per_batch)) {
          tokens += queue.front()->tokens;
          jobs.push_back(std::move(queue.front()));
          queue.pop_front();
        }
      }
      score(jobs);
      log_counts(false);
    }
  }

  void score(const std::vector<std::shared_ptr<Job>>& jobs) {
    std::vector<std::vector<int32_t>> all;
    std::vector<size_t> sizes;
    for (const auto& job : jobs) {
      sizes.push_back(job->seqs.size());
      for (auto& ids : job->seqs) all.push_back(std::move(ids));
    }
    log_debug("reward server: {} requests, {} sequences", jobs.size(), all.size());
    std::vector<RewardScores> parts(jobs.size());
    try {
      RewardScores scores = score_sequences(*scorer, std::move(all), opt.max_tokens_per_batch);
      size_t at = 0;
      for (size_t j = 0; j < jobs.size(); ++j) {
        const size_t n = sizes[j];
        parts[j].rewards.assign(scores.rewards.begin() + at, scores.rewards.begin() + at + n);
        parts[j].outputs.assign(scores.outputs.begin() + at, scores.outputs.begin() + at + n);
        at += n;
      }
    } catch (...) {
      for (const auto& job : jobs) job->done.set_exception(std::current_exception());
      return;
    }
    for (size_t j = 0; j < jobs.size(); ++j) {
      scored += int64_t(sizes[j]);
      jobs[j]->done.set_value(std::move(parts[j]));
    }
    served += int64_t(jobs.size());
  }

  void log_counts(bool last) {
    const auto now = std::chrono::steady_clock::now();
    if (!last && now - last_log < kLogInterval) return;
    const int64_t bad = rejected.exchange(0);
    if (served > 0 || bad > 0)
      log_info("reward server: {} requests ({} sequences) answered, {} rejected in the last {:.0f} s", served,
               scored, bad, std::chrono::duration<double>(now - last_log).count());
    served = scored = 0;
    last_log = now;
  }
};

RewardServer::RewardServer(std::unique_ptr<RewardScorer> scorer, RewardServerOptions opt)
    : state_(std::make_unique<State>()) {
  State& st = *state_;
  st.scorer = std::move(scorer);
  st.opt = opt;
  if (opt.max_tokens_per_batch < 1)
    fail("server.max_tokens_per_batch must be at least 1, got {}", opt.max_tokens_per_batch);
  if (opt.max_request_sequences < 1)
    fail("server.max_request_sequences must be at least 1, got {}", opt.max_request_sequences);
  if (opt.max_request_bytes < 1)
    fail("server.max_request_bytes must be at least 1, got {}", opt.max_request_bytes);
  if (opt.threads < 1) fail("server.threads must be at least 1, got {}", opt.threads);

  const size_t threads = size_t(opt.threads);
  st.http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  st.http.set_payload_max_length(size_t(opt.max_request_bytes));
  // httplib's default, SO_REUSEPORT, lets a second server bind the same port and take half of the
  // connections; SO_REUSEADDR only lets a restarted one bind while old connections linger.
  st.http.set_socket_options([](socket_t sock) {
    const int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  // Every handler answers, whatever happens: nothing a client sends may end the server.
  auto guarded = [&st](void (*handle)(State&, const httplib::Request&, httplib::Response&)) {
    return [&st, handle](const httplib::Request& req, httplib::Response& res) {
      try {
        handle(st, req, res);
      } catch (const c10::Error& e) {
        log_warn("reward server: {} {}: {}", req.method, req.path, e.what_without_backtrace());
        reply_error(res, 500, e.what_without_backtrace());
      } catch (const std::exception& e) {
        log_warn("reward server: {} {}: {}", req.method, req.path, e.what());
        reply_error(res, 500, e.what());
      } catch (...) {
        reply_error(res, 500, "unknown internal error");
      }
    };
  };
  st.http.Get("/health", guarded([](State& s, const httplib::Request&, httplib::Response& res) {
                s.handle_health(res);
              }));
  st.http.Post("/score", guarded([](State& s, const httplib::Request& req, httplib::Response& res) {
                 s.handle_score(req, res);
               }));
  auto wrong_method = [&st](const char* allowed) {
    return [&st, allowed](const httplib::Request& req, httplib::Response& res) {
      ++st.rejected;
      res.set_header("Allow", allowed);
      reply_error(res, 405, fmt::format("{} {}: method not allowed (use {})", req.method, req.path, allowed));
    };
  };
  st.http.Post("/health", wrong_method("GET"));
  for (const char* path : {"/health", "/score"}) {
    const char* allowed = std::strcmp(path, "/health") == 0 ? "GET" : "POST";
    st.http.Put(path, wrong_method(allowed));
    st.http.Patch(path, wrong_method(allowed));
    st.http.Delete(path, wrong_method(allowed));
  }
  st.http.Get("/score", wrong_method("POST"));
  // Errors httplib answers itself (an unknown path, a body over the limit, a malformed request)
  // get a JSON body too; those our handlers answered keep theirs.
  httplib::Server::HandlerWithResponse on_error = [&st](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    ++st.rejected;
    if (res.status == 404)
      reply_error(res, 404,
                  fmt::format("{} {}: no such path (the server answers GET /health and POST /score)",
                              req.method, req.path));
    else if (res.status == 413)
      reply_error(res, 413,
                  fmt::format("{}: larger than server.max_request_bytes ({} bytes)", kBody,
                              st.opt.max_request_bytes));
    else
      reply_error(res, res.status, fmt::format("{} {}: malformed HTTP request", req.method, req.path));
    return httplib::Server::HandlerResponse::Handled;
  };
  st.http.set_error_handler(std::move(on_error));
}

RewardServer::~RewardServer() {
  stop();
}

void RewardServer::start(const std::string& host, int port) {
  State& st = *state_;
  if (st.listener.joinable()) fail("the reward server is already serving on port {}", st.port);
  if (port < 0 || port > 65535) fail("server.port must be in [0, 65535], got {}", port);
  errno = 0;
  st.port = port == 0 ? st.http.bind_to_any_port(host) : (st.http.bind_to_port(host, port) ? port : -1);
  if (st.port < 0)
    fail("cannot listen on {}:{}{}", host, port, errno != 0 ? fmt::format(": {}", std::strerror(errno)) : "");
  st.worker = std::thread([&st] { st.work(); });
  st.listener = std::thread([&st] { st.http.listen_after_bind(); });
  // stop() only stops a server that is running; until it is, a stop would be lost.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!st.http.is_running() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!st.http.is_running()) {
    stop();
    fail("the reward server on {}:{} did not start", host, st.port);
  }
  log_info("reward server: serving {} on http://{}:{}", st.scorer->path, host, st.port);
}

int RewardServer::port() const {
  return state_->port;
}

void RewardServer::stop() {
  State& st = *state_;
  if (st.listener.joinable()) {
    // Returns once the connections under way are answered, which needs the worker still running.
    st.http.stop();
    st.listener.join();
  }
  if (st.worker.joinable()) {
    {
      std::lock_guard<std::mutex> lock(st.mutex);
      st.stopping = true;
    }
    st.wake.notify_all();
    st.worker.join();
    st.log_counts(true);
  }
}

}  // namespace aligner
