#include "algo/cai.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <regex>

#include "algo/constitution.h"
#include "algo/dpo.h"
#include "algo/rollout.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/common.h"
#include "data/packing.h"
#include "gen/engine.h"
#include "gen/generation_config.h"
#include "gen/sequence_stream.h"
#include "io/hf_checkpoint.h"
#include "io/http_client.h"
#include "io/jsonl.h"
#include "io/resumable_jsonl.h"
#include "text/trim.h"

namespace aligner {

namespace {

// A line of output; a response cut inside a UTF-8 sequence is invalid UTF-8, which JSON cannot hold.
std::string dump_line(const nlohmann::ordered_json& line) {
  return line.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

// The random choices for prompt `index`: draw k of it, for use `salt`. step_seed's low bits vary
// too little to be used alone (a product's low bits depend on its factors' low bits only).
uint64_t draw(uint64_t seed, int64_t index, int64_t k, int64_t salt) {
  return mix64(step_seed(seed, index, k, salt));
}

enum Salt : int64_t { kPrinciple = 1, kRequest = 2, kOrder = 3 };

struct Prompt {
  int64_t index = 0;  // the line's record index in the file
  Conversation conv;
};

std::vector<Prompt> read_prompts(const std::string& path, bool skip_bad_lines) {
  const JsonlFile file(path);
  std::vector<Prompt> out;
  int64_t bad = 0;
  for (int64_t i = 0; i < file.size(); ++i) {
    try {
      const std::string where = file.where(i);
      out.push_back({i, cai_prompt(file.read(i), where)});
    } catch (const Error& e) {
      if (!skip_bad_lines) throw;
      if (bad++ == 0) log_warn("{} (data.skip_bad_lines: skipped, and counted)", e.what());
    }
  }
  if (bad > 0) log_warn("{}: {} bad lines skipped", path, bad);
  if (out.empty()) fail("{}: no prompts", path);
  return out;
}

// A causal LM with its tokenizer and chat template.
struct Chat {
  std::unique_ptr<Tokenizer> tok;
  ChatTemplate tmpl;
  Transformer model;
  int64_t context = 0;
};

Chat load_chat(const std::string& dir, const std::string& template_name, at::Device device,
               at::ScalarType dtype) {
  Chat c;
  c.tok = load_tokenizer(dir);
  c.tmpl = resolve_chat_template(template_name, *c.tok);
  c.model = load_transformer(dir, device, dtype);
  check_tokenizer_fits(*c.tok, c.model.cfg.vocab_size, dir);
  c.context = context_length(c.model.cfg);
  return c;
}

struct Counts {
  int64_t prompts = 0, written = 0, too_long = 0, blank = 0, same = 0, undecided = 0, generated_tokens = 0;
};

// The model's replies to the conversations given (nullopt: none asked), trimmed; nullopt too for a
// conversation that leaves no room to reply in the model's context (counted in too_long).
std::vector<std::optional<std::string>> reply(const Chat& c,
                                              const std::vector<std::optional<Conversation>>& convs,
                                              const GenerationOptions& opt, Counts& counts) {
  std::vector<std::vector<int32_t>> ids;
  std::vector<size_t> asked;
  for (size_t i = 0; i < convs.size(); ++i) {
    if (!convs[i]) continue;
    auto t = render_tokens(c.tmpl, *convs[i], true, *c.tok).ids;
    if (int64_t(t.size()) >= c.context) {
      ++counts.too_long;
      continue;
    }
    ids.push_back(std::move(t));
    asked.push_back(i);
  }
  std::vector<std::optional<std::string>> out(convs.size());
  if (ids.empty()) return out;
  const GenerationResult r = generate(c.model, ids, opt);
  counts.generated_tokens += r.generated_tokens;
  for (const auto& s : r.sequences)
    out[asked[size_t(s.prompt_index)]] = trim(response_text(s, *c.tok, opt.stop_strings, false).text);
  return out;
}

// "cai critique: 12/600 prompts, 11 lines written, 3,456 tokens generated (120 tok/s), ETA 3m12s",
// every 10 s and at the end.
void report(JobProgress& progress, const std::string& what, const Counts& c, int64_t total, bool always) {
  progress.update(c.prompts, always, [&](double s, double eta) {
    return fmt::format("{}: {}/{} prompts, {} lines written, {} tokens generated ({} tok/s), ETA {}", what,
                       c.prompts, total, c.written, format_thousands(c.generated_tokens),
                       format_thousands(std::llround(double(c.generated_tokens) / std::max(s, 1e-9))),
                       format_duration(eta));
  });
}

// What the two commands share: the constitution, the prompts, the model that answers them and how.
struct Job {
  std::vector<Principle> principles;
  std::vector<Prompt> prompts;
  GenerationOptions gen;
  int64_t per_batch = 0;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  Chat chat;
};

// Everything the config says that can be checked is checked before the model is loaded.
Job open_job(const Config& cfg) {
  Job j;
  j.principles = read_constitution(cfg.get_string("constitution"));
  j.prompts = read_prompts(cfg.get_string("data.prompts"), cfg.get_bool("data.skip_bad_lines"));
  j.gen = read_generation_options(cfg, "gen.max_new_tokens");
  j.per_batch = cfg.get_int("prompts_per_batch");
  if (j.per_batch < 1) fail("config key 'prompts_per_batch' must be at least 1, got {}", j.per_batch);
  j.device = parse_device_name(cfg.get_string("model.device"), "model.device");
  j.dtype = parse_compute_dtype(cfg.get_string("model.dtype"), j.device, "model.dtype");
  j.chat = load_chat(cfg.get_string("model.path"), cfg.get_string("data.template"), j.device, j.dtype);
  j.gen.tokenizer = j.chat.tok.get();
  check_generation_options(j.gen);
  return j;
}

// --out, continued (io/resumable_jsonl.h), open for appending.
struct Output {
  std::string path;
  ResumedJsonl resumed;
  std::ofstream file;
};

// `kind`: a field every line of this command's output has, so that another command's is not
// continued.
Output open_output(const Config& cfg, const std::string& kind) {
  Output o;
  o.path = cfg.get_string("out");
  o.resumed = resume_jsonl(o.path, "prompt_index", kind, cfg.get_bool("overwrite"));
  if (o.resumed.continued)
    log_info("continuing {} from prompt {}, the {} lines before it kept (overwrite=true starts afresh)",
             o.path, o.resumed.first_index, o.resumed.kept_lines);
  o.file.open(o.path, std::ios::app | std::ios::binary);
  if (!o.file) fail("cannot write {}", o.path);
  return o;
}

void write_lines(Output& out, const std::string& lines) {
  out.file << lines;
  out.file.flush();
  if (!out.file) fail("error writing {}", out.path);
}

// The prompts of each batch that has one at or after `first`, in order: batch b holds the prompts
// whose index is in [b * per_batch, (b + 1) * per_batch).
template <class F>
void for_each_batch(const std::vector<Prompt>& prompts, int64_t per_batch, int64_t first, F&& f) {
  size_t i = 0;
  while (i < prompts.size() && prompts[i].index < first / per_batch * per_batch) ++i;
  while (i < prompts.size()) {
    const int64_t batch = prompts[i].index / per_batch;
    std::vector<const Prompt*> members;
    while (i < prompts.size() && prompts[i].index / per_batch == batch) members.push_back(&prompts[i++]);
    f(batch, members);
  }
}

int64_t prompts_from(const std::vector<Prompt>& prompts, int64_t first) {
  int64_t n = 0;
  for (const auto& p : prompts) n += p.index >= first;
  return n;
}

nlohmann::ordered_json nemo_turn(const Message& m) {
  return {{"from", m.role == "user" ? "User" : "Assistant"}, {"value", m.content}, {"label", nullptr}};
}

nlohmann::ordered_json messages_json(const Conversation& conv) {
  auto out = nlohmann::ordered_json::array();
  if (conv.system) out.push_back({{"role", "system"}, {"content", *conv.system}});
  for (const auto& m : conv.messages) out.push_back({{"role", m.role}, {"content", m.content}});
  return out;
}

// The judge's probability that the first option is the better, per question; nullopt where it
// gave none (a question too long for a judge model, an answer naming neither option).
class Judge {
 public:
  virtual ~Judge() = default;
  virtual std::vector<std::optional<double>> prefer_first(const std::vector<std::string>& questions,
                                                          int64_t prompt_index) = 0;
};

class ModelJudge final : public Judge {
 public:
  explicit ModelJudge(Chat chat) : c_(std::move(chat)), pad_(pad_id_for(*c_.tok)) {}

  std::vector<std::optional<double>> prefer_first(const std::vector<std::string>& questions,
                                                  int64_t) override {
    std::vector<std::optional<double>> out(questions.size());
    std::vector<Sequence> seqs;
    std::vector<size_t> scored;
    for (size_t i = 0; i < questions.size(); ++i) {
      auto pair = judge_sequences(c_.tmpl, *c_.tok, questions[i]);
      if (int64_t(std::max(pair[0].input_ids.size(), pair[1].input_ids.size())) >
          c_.model.cfg.max_position_embeddings)
        continue;
      seqs.push_back(std::move(pair[0]));
      seqs.push_back(std::move(pair[1]));
      scored.push_back(i);
    }
    if (seqs.empty()) return out;
    at::NoGradGuard no_grad;
    const auto sums = response_logprobs(c_.model, collate_padded(seqs, pad_)).sum.to(at::kDouble).cpu();
    for (size_t k = 0; k < scored.size(); ++k) {
      const double a = sums[int64_t(2 * k)].item<double>(), b = sums[int64_t(2 * k + 1)].item<double>();
      out[scored[k]] = 1.0 / (1.0 + std::exp(b - a));
    }
    return out;
  }

 private:
  Chat c_;
  int32_t pad_;
};

// "A", "(A", " A", "\u2581A" (SentencePiece's space) and the like name option A.
char option_letter(std::string token) {
  for (const std::string space : {"\u2581", "\u0120"})  // "Ġ": byte-level BPE's space, as it is
    for (size_t at; (at = token.find(space)) != std::string::npos;) token.erase(at, space.size());
  token.erase(std::remove_if(token.begin(), token.end(),
                             [](char ch) {
                               return std::isspace(static_cast<unsigned char>(ch)) || ch == '(' || ch == ')';
                             }),
              token.end());
  return token == "A" || token == "B" ? token[0] : 0;
}

class EndpointJudge final : public Judge {
 public:
  EndpointJudge(const std::string& url, const HttpUrl& parsed, std::string model, double timeout_s)
      : url_(url),
        path_(parsed.path.size() <= 1 ? "/v1/chat/completions" : parsed.path),
        model_(std::move(model)),
        client_(parsed, url, "the judge", timeout_s) {}

  std::vector<std::optional<double>> prefer_first(const std::vector<std::string>& questions,
                                                  int64_t prompt_index) override {
    std::vector<std::optional<double>> out;
    for (size_t i = 0; i < questions.size(); ++i) {
      nlohmann::json body = {{"messages", {{{"role", "user"}, {"content", questions[i]}}}},
                             {"max_tokens", 8},
                             {"temperature", 0},
                             {"logprobs", true},
                             {"top_logprobs", 20}};
      if (!model_.empty()) body["model"] = model_;
      const std::string label = fmt::format(" (prompt {}, question {})", prompt_index, i);
      const auto answer =
          client_.post(path_, body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), label);
      out.push_back(read_answer(answer, label));
    }
    return out;
  }

 private:
  // The first answer position whose token names an option: the two options' probabilities among
  // its top log-probs, normalised (one not listed counts as 0); else the first option the text
  // names. An earlier position's runners-up ("A" where the answer began "The") are not answers.
  std::optional<double> read_answer(const nlohmann::json& answer, const std::string& label) {
    const nlohmann::json* choice = nullptr;
    if (answer.is_object() && answer.contains("choices") && answer["choices"].is_array() &&
        !answer["choices"].empty() && answer["choices"][0].is_object())
      choice = &answer["choices"][0];
    if (!choice || !choice->contains("message") || !(*choice)["message"].is_object())
      fail("{}{}: expected an OpenAI chat completion {{\"choices\": [{{\"message\": ...}}]}}, got {}", url_,
           label, answer.dump().substr(0, 300));
    if (choice->contains("logprobs") && (*choice)["logprobs"].is_object() &&
        (*choice)["logprobs"].contains("content") && (*choice)["logprobs"]["content"].is_array()) {
      for (const auto& position : (*choice)["logprobs"]["content"]) {
        if (!position.is_object() || !position.contains("token") || !position["token"].is_string() ||
            !option_letter(position["token"].get<std::string>()))
          continue;
        double a = -std::numeric_limits<double>::infinity(), b = a;
        bool named = false;
        // Without top_logprobs, the answer's own token at the position.
        const auto& top = position.contains("top_logprobs") && position["top_logprobs"].is_array()
                              ? position["top_logprobs"]
                              : nlohmann::json::array({position});
        for (const auto& t : top) {
          if (!t.is_object() || !t.contains("token") || !t["token"].is_string() || !t.contains("logprob") ||
              !t["logprob"].is_number())
            continue;
          const char letter = option_letter(t["token"].get<std::string>());
          if (!letter) continue;
          double& to = letter == 'A' ? a : b;
          const double lp = t["logprob"].get<double>();
          // Several spellings of one option add up.
          to = std::max(to, lp) + std::log1p(std::exp(-std::abs(to - lp)));
          named = true;
        }
        if (named) return std::isinf(b) ? 1.0 : 1.0 / (1.0 + std::exp(b - a));
      }
    }
    const auto& content =
        (*choice)["message"].contains("content") ? (*choice)["message"]["content"] : nlohmann::json();
    if (content.is_string()) {
      static const std::regex option(R"((^|[^A-Za-z])([AB])([^A-Za-z]|$))");
      std::smatch m;
      const std::string text = content.get<std::string>();
      if (std::regex_search(text, m, option)) return m[2].str() == "A" ? 1.0 : 0.0;
    }
    return std::nullopt;
  }

  std::string url_, path_, model_;
  JsonHttpClient client_;
};

}  // namespace

Conversation cai_prompt(const nlohmann::json& r, const std::string& where) {
  Conversation conv;
  if (r.contains("messages")) {
    conv = parse_messages(r["messages"], where, "messages", false);
  } else if (r.contains("conversations")) {
    ChatFormat format = ChatFormat::kPlain;
    conv = parse_nemo_conversation(r, where, format, false);
  } else if (r.contains("prompt")) {
    TextOrChat p = parse_text_or_chat(r["prompt"], where, "prompt", false);
    if (p.is_chat)
      conv = std::move(p.chat);
    else
      conv.messages.push_back({"user", std::move(p.text), ""});
  } else {
    fail("{}: not a prompt line: expected a field prompt, messages or conversations", where);
  }
  while (!conv.messages.empty() && conv.messages.back().role == "assistant") conv.messages.pop_back();
  if (conv.messages.empty()) fail("{}: the conversation has no user turn to answer", where);
  if (is_blank(conv.messages.back().content)) fail("{}: empty prompt", where);
  return conv;
}

std::string judge_question(const Conversation& prompt, const std::string& comparison, const std::string& a,
                           const std::string& b) {
  std::string q = "Consider this conversation between a human and an AI assistant:\n";
  for (const auto& m : prompt.messages)
    q += fmt::format("\n{}: {}\n", m.role == "user" ? "Human" : "Assistant", m.content);
  q += fmt::format("\n{}\n\nOptions:\n(A) {}\n(B) {}\n\nAnswer with the letter of the better option, A or B.",
                   comparison, a, b);
  return q;
}

std::array<Sequence, 2> judge_sequences(const ChatTemplate& tmpl, const Tokenizer& tok,
                                        const std::string& question) {
  Conversation conv;
  conv.messages.push_back({"user", question, ""});
  const std::vector<int32_t> context = render_tokens(tmpl, conv, true, tok).ids;
  std::array<Sequence, 2> out;
  for (int k = 0; k < 2; ++k) {
    const std::vector<int32_t> reply =
        tok.encode(k == 0 ? "The answer is: (A)" : "The answer is: (B)", false);
    out[k].input_ids = context;
    out[k].input_ids.insert(out[k].input_ids.end(), reply.begin(), reply.end());
    out[k].loss_mask.assign(context.size(), 0);
    out[k].loss_mask.resize(out[k].input_ids.size(), 1);
  }
  return out;
}

void run_cai_critique(const Config& cfg) {
  const std::vector<Message> few_shot =
      cfg.get_string("few_shot").empty() ? std::vector<Message>{} : read_few_shot(cfg.get_string("few_shot"));
  const Job job = open_job(cfg);
  Output out = open_output(cfg, "conversations");
  const int64_t first = out.resumed.first_index;
  const uint64_t seed = job.gen.seed;

  Counts counts;
  const int64_t total = prompts_from(job.prompts, first);
  JobProgress progress(total);
  for_each_batch(job.prompts, job.per_batch, first, [&](int64_t batch, const std::vector<const Prompt*>& ps) {
    const size_t n = ps.size();
    GenerationOptions g = job.gen;
    std::vector<std::optional<Conversation>> convs(n);
    for (size_t k = 0; k < n; ++k) convs[k] = ps[k]->conv;
    g.seed = step_seed(seed, batch, 0, 0);
    const auto answers = reply(job.chat, convs, g, counts);

    // The critique: the few-shot exchanges, the prompt and the answer, then the critique request.
    std::vector<const Principle*> principle(n);
    for (size_t k = 0; k < n; ++k) {
      const int64_t index = ps[k]->index;
      principle[k] = &job.principles[draw(seed, index, 0, kPrinciple) % job.principles.size()];
      if (!answers[k]) {
        convs[k].reset();
        continue;
      }
      const auto& requests = principle[k]->critique_requests;
      Conversation c;
      c.system = ps[k]->conv.system;
      c.messages = few_shot;
      c.messages.insert(c.messages.end(), ps[k]->conv.messages.begin(), ps[k]->conv.messages.end());
      c.messages.push_back({"assistant", *answers[k], ""});
      c.messages.push_back({"user", requests[draw(seed, index, 0, kRequest) % requests.size()], ""});
      convs[k] = std::move(c);
    }
    g.seed = step_seed(seed, batch, 0, 1);
    const auto critiques = reply(job.chat, convs, g, counts);

    // The revision: all that, the critique, then the revision request.
    std::vector<std::string> critique_requests(n);
    for (size_t k = 0; k < n; ++k) {
      if (!critiques[k]) {
        convs[k].reset();
        continue;
      }
      critique_requests[k] = convs[k]->messages.back().content;
      convs[k]->messages.push_back({"assistant", *critiques[k], ""});
      convs[k]->messages.push_back({"user", principle[k]->revision_request, ""});
    }
    g.seed = step_seed(seed, batch, 0, 2);
    const auto revisions = reply(job.chat, convs, g, counts);

    std::string lines;
    for (size_t k = 0; k < n; ++k) {
      if (ps[k]->index < first) continue;
      ++counts.prompts;
      if (!revisions[k]) continue;
      // sft refuses an empty reply.
      if (revisions[k]->empty()) {
        ++counts.blank;
        continue;
      }
      const Conversation& p = ps[k]->conv;
      auto turns = nlohmann::ordered_json::array();
      for (const auto& m : p.messages) turns.push_back(nemo_turn(m));
      turns.push_back(nemo_turn({"assistant", *revisions[k], ""}));
      lines += dump_line({{"system", p.system.value_or("")},
                          {"conversations", turns},
                          {"mask", "User"},
                          {"prompt_index", ps[k]->index},
                          {"principle", principle[k]->name},
                          {"response", *answers[k]},
                          {"critique_request", critique_requests[k]},
                          {"critique", *critiques[k]},
                          {"revision_request", principle[k]->revision_request}});
      ++counts.written;
    }
    write_lines(out, lines);
    report(progress, "cai critique", counts, total, false);
  });
  report(progress, "cai critique", counts, total, true);
  if (counts.too_long > 0)
    log_warn(
        "{} answers, critiques or revisions were not asked for: the conversation left no room in the model's "
        "context ({} tokens)",
        counts.too_long, job.chat.context);
  if (counts.blank > 0)
    log_warn("{} revisions were empty and left out: aligner sft cannot train on them", counts.blank);
  log_info("wrote {} revisions to {}", counts.written, out.path);
}

void run_cai_compare(const Config& cfg) {
  const std::vector<double> temperatures = cfg.get_float_list("gen.temperatures");
  if (temperatures.size() < 2)
    fail("config key 'gen.temperatures' needs at least 2 temperatures (one response each), got {}",
         temperatures.size());
  for (double t : temperatures)
    if (!(t >= 0)) fail("config key 'gen.temperatures': {} is negative (0 is greedy)", t);
  const std::string judge_path = cfg.get_string("judge.path"), judge_url = cfg.get_string("judge.url");
  if (judge_path.empty() == judge_url.empty())
    fail(
        "set one of judge.path (--judge DIR, a judge model) and judge.url (--judge-url URL, a chat "
        "endpoint){}",
        judge_path.empty() ? "" : ", not both");
  const double timeout_s = cfg.get_float("judge.timeout_s");
  if (!(timeout_s > 0 && timeout_s <= 1e6))
    fail("config key 'judge.timeout_s' must be positive and at most 1e6 (seconds), got {}", timeout_s);
  const HttpUrl parsed_url = judge_url.empty() ? HttpUrl{} : parse_http_url(judge_url, "judge.url", true);
  const Job job = open_job(cfg);
  std::unique_ptr<Judge> judge;
  if (!judge_path.empty())
    judge = std::make_unique<ModelJudge>(
        load_chat(judge_path, cfg.get_string("judge.template"), job.device, job.dtype));
  else
    judge = std::make_unique<EndpointJudge>(judge_url, parsed_url, cfg.get_string("judge.model"), timeout_s);
  Output out = open_output(cfg, "chosen");
  const int64_t first = out.resumed.first_index;
  const uint64_t seed = job.gen.seed;

  const size_t R = temperatures.size();
  Counts counts;
  const int64_t total = prompts_from(job.prompts, first);
  JobProgress progress(total);
  for_each_batch(job.prompts, job.per_batch, first, [&](int64_t batch, const std::vector<const Prompt*>& ps) {
    std::vector<std::optional<Conversation>> convs;
    for (const Prompt* p : ps) convs.push_back(p->conv);
    std::vector<std::vector<std::optional<std::string>>> responses;  // [temperature][prompt]
    for (size_t t = 0; t < R; ++t) {
      GenerationOptions g = job.gen;
      g.sampling.temperature = temperatures[t];
      g.seed = step_seed(seed, batch, 0, int64_t(t));
      responses.push_back(reply(job.chat, convs, g, counts));
    }
    for (size_t k = 0; k < ps.size(); ++k) {
      const int64_t index = ps[k]->index;
      if (index < first) continue;
      ++counts.prompts;
      struct Pair {
        size_t i, j;
        bool swapped;  // option (A) is j's response
        const Principle* principle;
      };
      std::vector<Pair> pairs;
      std::vector<std::string> questions;
      int64_t pair_number = 0;  // every pair has one, judged or not, so that its draws stay its own
      for (size_t i = 0; i < R; ++i) {
        for (size_t j = i + 1; j < R; ++j, ++pair_number) {
          const auto &a = responses[i][k], &b = responses[j][k];
          if (!a || !b) continue;
          if (a->empty() || b->empty()) {
            ++counts.blank;
            continue;
          }
          if (*a == *b) {
            ++counts.same;
            continue;
          }
          const Pair p{i, j, bool(draw(seed, index, pair_number, kOrder) & 1),
                       &job.principles[draw(seed, index, pair_number, kPrinciple) % job.principles.size()]};
          questions.push_back(
              judge_question(ps[k]->conv, p.principle->comparison, p.swapped ? *b : *a, p.swapped ? *a : *b));
          pairs.push_back(p);
        }
      }
      if (pairs.empty()) continue;
      const auto first_wins = judge->prefer_first(questions, index);
      std::string lines;
      for (size_t q = 0; q < pairs.size(); ++q) {
        const Pair& p = pairs[q];
        if (!first_wins[q]) {
          ++counts.undecided;
          continue;
        }
        const double pi =
            p.swapped ? 1.0 - *first_wins[q] : *first_wins[q];  // that i's response is the better
        const bool i_wins = pi >= 0.5;
        const size_t c = i_wins ? p.i : p.j, r = i_wins ? p.j : p.i;
        lines += dump_line({{"prompt", messages_json(ps[k]->conv)},
                            {"chosen", *responses[c][k]},
                            {"rejected", *responses[r][k]},
                            {"margin", i_wins ? pi : 1.0 - pi},
                            {"prompt_index", index},
                            {"principle", p.principle->name},
                            {"chosen_option", i_wins != p.swapped ? "A" : "B"},
                            {"temperatures", {temperatures[c], temperatures[r]}}});
        ++counts.written;
      }
      write_lines(out, lines);
    }
    report(progress, "cai compare", counts, total, false);
  });
  report(progress, "cai compare", counts, total, true);
  if (counts.too_long > 0)
    log_warn("{} responses were not asked for: the prompt left no room in the model's context ({} tokens)",
             counts.too_long, job.chat.context);
  if (counts.blank > 0 || counts.same > 0)
    log_warn("pairs not judged: {} with an empty response, {} with two equal ones", counts.blank,
             counts.same);
  if (counts.undecided > 0)
    log_warn(
        "{} pairs got no judgement (a question too long for the judge model, or an answer naming neither "
        "option)",
        counts.undecided);
  log_info("wrote {} preference pairs to {}", counts.written, out.path);
}

}  // namespace aligner
