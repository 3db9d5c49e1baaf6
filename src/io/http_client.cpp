#include "io/http_client.h"

#include <httplib.h>

#include <chrono>
#include <regex>
#include <thread>

#include "core/error.h"
#include "core/json.h"
#include "core/log.h"

namespace aligner {

namespace {

constexpr int kAttempts = 4;  // a server that is restarting, or busy accepting, gets 0.5 + 1 + 2 s

}  // namespace

HttpUrl parse_http_url(const std::string& url, const std::string& what, bool allow_path) {
  static const std::regex re(R"(http://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})(/[^\s?#]*)?)");
  std::smatch m;
  const std::string expected = allow_path ? "http://HOST:PORT[/PATH]" : "http://HOST:PORT";
  if (!std::regex_match(url, m, re) || (!allow_path && m[3].length() > 1))
    fail("{} '{}': expected {}{}", what, url, expected,
         url.rfind("https://", 0) == 0 ? " (https is not supported)" : "");
  HttpUrl u;
  u.host = m[1].str();
  if (u.host.front() == '[') u.host = u.host.substr(1, u.host.size() - 2);
  u.port = std::stoi(m[2].str());
  if (u.port < 1 || u.port > 65535) fail("{} '{}': port {} is not in [1, 65535]", what, url, u.port);
  if (allow_path) u.path = m[3].str();
  return u;
}

struct JsonHttpClient::Impl {
  Impl(const HttpUrl& url, std::string name, std::string peer, double timeout_s)
      : name(std::move(name)), peer(std::move(peer)), timeout_s(timeout_s), client(url.host, url.port) {
    const auto usec = [](double s) { return std::chrono::microseconds(int64_t(s * 1e6)); };
    client.set_connection_timeout(usec(std::min(timeout_s, 30.0)));
    client.set_read_timeout(usec(timeout_s));
    client.set_write_timeout(usec(timeout_s));
  }

  template <class F>
  nlohmann::json call(const std::string& what, F request) {
    double pause = 0.5;
    for (int attempt = 1;; ++attempt) {
      const auto t0 = std::chrono::steady_clock::now();
      httplib::Result res = request();
      if (res) {
        if (res->status != 200) {
          std::string message = res->body.substr(0, 500);
          try {
            const auto j = parse_json(res->body, "answer");
            if (j.is_object() && j.contains("error") && j["error"].is_string()) message = j["error"];
          } catch (const Error&) {
            // not JSON: the body as it is
          }
          fail("{}{}: HTTP {}: {}", name, what, res->status, message);
        }
        return parse_json(res->body, name + what);
      }
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const std::string error = fmt::format("{} error", httplib::to_string(res.error()));
      const bool timed_out = waited >= 0.9 * timeout_s;
      if (attempt == kAttempts || timed_out)
        fail("{}{}: no answer from {} after {} attempt{}: {}{}", name, what, peer, attempt,
             attempt == 1 ? "" : "s", error,
             timed_out ? fmt::format(" (nothing within the timeout of {:g} s)", timeout_s) : "");
      log_warn("{}{}: {}; trying again in {:.1f} s", name, what, error, pause);
      std::this_thread::sleep_for(std::chrono::duration<double>(pause));
      pause *= 2;
    }
  }

  std::string name, peer;
  double timeout_s;
  httplib::Client client;
};

JsonHttpClient::JsonHttpClient(const HttpUrl& url, std::string name, std::string peer, double timeout_s)
    : impl_(std::make_unique<Impl>(url, std::move(name), std::move(peer), timeout_s)) {}

JsonHttpClient::~JsonHttpClient() = default;

nlohmann::json JsonHttpClient::get(const std::string& path, const std::string& what) {
  return impl_->call(what, [&] { return impl_->client.Get(path); });
}

nlohmann::json JsonHttpClient::post(const std::string& path, const std::string& body,
                                    const std::string& what) {
  return impl_->call(what, [&] { return impl_->client.Post(path, body, "application/json"); });
}

}  // namespace aligner
