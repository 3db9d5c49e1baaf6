// JSON over plain HTTP to a server aligner depends on (a reward server, a judge model's chat
// endpoint): a timeout on every request, a few more tries for a connection that fails, and errors
// that name the url, the request and what came back. httplib stays inside http_client.cpp, the one
// file that needs its compile definitions.
#pragma once
#include <nlohmann/json.hpp>

#include <memory>
#include <string>

namespace aligner {

struct HttpUrl {
  std::string host;  // an IPv6 address without its brackets
  int port = 0;
  std::string path;  // "" or "/...", as given
};

// http://HOST:PORT, and /PATH after it when allow_path. Errors start with `what` and the url
// ("reward server url 'x': expected http://HOST:PORT"); https is not supported.
HttpUrl parse_http_url(const std::string& url, const std::string& what, bool allow_path);

class JsonHttpClient {
 public:
  // `name`: the url as messages give it (paths follow it); `peer`: what answers there ("the reward
  // server"). A request that waits timeout_s without an answer fails.
  JsonHttpClient(const HttpUrl& url, std::string name, std::string peer, double timeout_s);
  ~JsonHttpClient();
  JsonHttpClient(const JsonHttpClient&) = delete;
  JsonHttpClient& operator=(const JsonHttpClient&) = delete;

  // The JSON answer with status 200. `what` follows the name in errors ("/score (queries 0 to 9)").
  // Another status is an error with the answer's "error" field, or the start of its body. A request
  // that gets no answer is tried again after 0.5, 1 and 2 s, unless it waited out the whole timeout
  // (the server is up but slow, and asking again would only wait as long again).
  nlohmann::json get(const std::string& path, const std::string& what);
  nlohmann::json post(const std::string& path, const std::string& body, const std::string& what);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aligner
