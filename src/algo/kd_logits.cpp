#include "algo/kd_logits.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include "algo/data_stream.h"
#include "algo/sft.h"
#include "core/error.h"
#include "core/log.h"
#include "data/packing.h"
#include "io/hf_checkpoint.h"
#include "text/chat_template.h"
#include "train/run_setup.h"

namespace aligner {
namespace {

constexpr const char* kFormat = "aligner kd-prepare top-k logits v1";
// The data.* settings that decide an example's tokens, and so the rows the file holds.
constexpr const char* kSettings[] = {"data.format", "data.template", "data.max_length", "data.truncation",
                                     "data.add_eos"};

using Metadata = std::map<std::string, std::string>;

// The tokens an example is trained to predict, in order: what the batch's labels will hold for it.
std::vector<int32_t> loss_targets(const Sequence& seq) {
  std::vector<int32_t> out;
  for (size_t t = 1; t < seq.input_ids.size(); ++t)
    if (seq.loss_mask[t]) out.push_back(seq.input_ids[t]);
  return out;
}

// The data file and how it is tokenized: what sft must find the same to use the file.
Metadata data_identity(const SftDataset& ds) {
  const std::string& path = ds.file.path();
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot read: {}", path, std::strerror(errno));
  // FNV-1a over the content: the same records under another path are the same data.
  uint64_t hash = 14695981039346656037ull, bytes = 0;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), std::streamsize(buf.size()));
    for (std::streamsize i = 0; i < in.gcount(); ++i)
      hash = (hash ^ uint8_t(buf[size_t(i)])) * 1099511628211ull;
    bytes += uint64_t(in.gcount());
  }
  return {{"data", path},
          {"data_lines", std::to_string(ds.file.size())},  // records: the non-blank lines
          {"data_bytes", std::to_string(bytes)},
          {"data_fnv1a64", fmt::format("{:016x}", hash)},
          {"data.format", ds.opt.format},
          {"data.template", chat_format_name(ds.tmpl.format)},
          {"data.max_length", std::to_string(ds.opt.max_length)},
          {"data.truncation", ds.opt.truncation == Truncation::kDrop ? "drop" : "truncate_left"},
          {"data.add_eos", ds.opt.add_eos ? "true" : "false"}};
}

// The output, each row written at its place as the teacher produces it, so that the logits of a
// large data set need not fit in memory. Written to "<path>.tmp" and renamed once complete, so
// that a crash never leaves a partial file under the final name.
class OutputFile {
 public:
  // `header`: the safetensors header; data_bytes: the size of the data section after it.
  OutputFile(std::string path, const nlohmann::ordered_json& header, size_t data_bytes)
      : path_(std::move(path)), tmp_(path_ + ".tmp") {
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');  // aligns the data for every dtype
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail_io("cannot create");
    data_start_ = sizeof len + text.size();
    if (::ftruncate(fd_, off_t(data_start_ + data_bytes)) != 0) fail_io("cannot size");
    write_raw(0, len, sizeof len);
    write_raw(sizeof len, text.data(), text.size());
  }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  ~OutputFile() {
    if (fd_ >= 0) {
      ::close(fd_);
      ::unlink(tmp_.c_str());
    }
  }

  // n bytes at byte `offset` of the data section.
  void write(size_t offset, const void* data, size_t n) { write_raw(data_start_ + offset, data, n); }

  void commit() {
    // fsync before rename: otherwise a crash can leave an empty file under the final name.
    bool ok = ::fsync(fd_) == 0;
    ok = ::close(fd_) == 0 && ok;
    fd_ = -1;
    if (!ok || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp_.c_str());
      errno = err;
      fail_io("write failed");
    }
  }

 private:
  void write_raw(size_t pos, const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::pwrite(fd_, p, n, off_t(pos));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) fail_io("write failed");
      p += w;
      pos += size_t(w);
      n -= size_t(w);
    }
  }
  [[noreturn]] void fail_io(const char* what) const { fail("{}: {}: {}", tmp_, what, std::strerror(errno)); }

  std::string path_, tmp_;
  int fd_ = -1;
  size_t data_start_ = 0;
};

// Runs `teacher` over `ds` and writes its top-k logits at every loss token to `path`.
void write_topk(const std::string& path, SftDataset& ds, const Transformer& teacher,
                const std::string& teacher_dir, int64_t k, int64_t batch_size, int32_t pad_id,
                at::Device device) {
  at::NoGradGuard no_grad;
  const int64_t records = dataset_size(ds);
  // First the rows of every example, so that each one's place in the file is known before the
  // teacher runs; the tokens are made again for the forward rather than held.
  std::vector<int64_t> offsets(size_t(records) + 1, 0), lengths(size_t(records), 0);
  for (int64_t e = 0; e < records; ++e) {
    int64_t rows = 0;
    if (auto seq = sft_example(ds, e)) {
      lengths[size_t(e)] = int64_t(seq->input_ids.size());
      rows = int64_t(loss_targets(*seq).size());
    }
    offsets[size_t(e) + 1] = offsets[size_t(e)] + rows;
  }
  const int64_t n_rows = offsets.back();
  log_info("kd-prepare: {}: {} records, {} loss tokens; the top {} logits of {}", ds.file.path(), records,
           n_rows, k, teacher_dir);

  Metadata meta = data_identity(ds);
  meta["format"] = kFormat;
  meta["teacher"] = teacher_dir;
  meta["top_k"] = std::to_string(k);
  meta["vocab_size"] = std::to_string(teacher.cfg.vocab_size);
  // The dtype lm_logits gives (model.dtype), which holds the values exactly.
  const at::ScalarType values_dtype = teacher.cfg.dtype;
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = meta;
  size_t end = 0;
  // Each tensor's byte offset in the data section. The 8-byte offsets come first and the 2- or
  // 4-byte values last, so that every tensor starts aligned for its dtype.
  auto add = [&](const std::string& name, at::ScalarType dtype, std::vector<int64_t> shape) {
    const size_t begin = end;
    end += c10::elementSize(dtype) *
           size_t(std::accumulate(shape.begin(), shape.end(), int64_t(1), std::multiplies<int64_t>()));
    header[name] = {
        {"dtype", safetensors::dtype_to_string(dtype)}, {"shape", shape}, {"data_offsets", {begin, end}}};
    return begin;
  };
  const size_t offsets_at = add("offsets", at::kLong, {records + 1});
  const size_t ids_at = add("ids", at::kInt, {n_rows, k});
  const size_t targets_at = add("targets", at::kInt, {n_rows});
  const size_t values_at = add("values", values_dtype, {n_rows, k});
  const size_t value_bytes = c10::elementSize(values_dtype);
  OutputFile out(path, header, end);
  out.write(offsets_at, offsets.data(), offsets.size() * sizeof(int64_t));

  // Batches of similar lengths waste little on padding; each example's rows go to their place.
  std::vector<int64_t> order;
  for (int64_t e = 0; e < records; ++e)
    if (offsets[size_t(e) + 1] > offsets[size_t(e)]) order.push_back(e);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[size_t(a)] < lengths[size_t(b)]; });
  const size_t batches = (order.size() + size_t(batch_size) - 1) / size_t(batch_size);
  for (size_t start = 0, batch = 0; start < order.size(); start += size_t(batch_size), ++batch) {
    const std::vector<int64_t> examples(
        order.begin() + int64_t(start),
        order.begin() + int64_t(std::min(order.size(), start + size_t(batch_size))));
    std::vector<Sequence> seqs;
    for (int64_t e : examples) seqs.push_back(sft_example(ds, e).value());  // read before, so present
    const Batch b = collate_padded(seqs, pad_id);
    ForwardInput in{b.input_ids.to(device), b.attention_mask.to(device), b.position_ids.to(device)};
    const auto hidden = forward_hidden(teacher, in);
    // The loss tokens row by row, as the student's loss reads them.
    const auto rows = (b.labels.reshape({-1}) != kIgnoreIndex).nonzero().squeeze(1).to(device);
    const auto top = lm_topk(teacher, hidden.reshape({-1, hidden.size(-1)}).index_select(0, rows), k,
                             logit_chunk_rows(teacher));
    const auto values = top.first.to(values_dtype).cpu().contiguous();
    const auto ids = top.second.to(at::kInt).cpu().contiguous();
    int64_t r = 0;
    for (size_t i = 0; i < examples.size(); ++i) {
      const size_t first = size_t(offsets[size_t(examples[i])]);
      const auto targets = loss_targets(seqs[i]);
      const int64_t n = int64_t(targets.size());
      out.write(ids_at + first * size_t(k) * sizeof(int32_t), ids[r].data_ptr(),
                size_t(n * k) * sizeof(int32_t));
      out.write(targets_at + first * sizeof(int32_t), targets.data(), targets.size() * sizeof(int32_t));
      out.write(values_at + first * size_t(k) * value_bytes, values[r].data_ptr(),
                size_t(n * k) * value_bytes);
      r += n;
    }
    if ((batch + 1) % std::max<size_t>(1, batches / 10) == 0)
      log_info("kd-prepare: {}: {}/{} batches", ds.file.path(), batch + 1, batches);
  }
  out.commit();
  const auto report = data_report(ds.stats, ds.file.path(), ds.opt.max_length);
  if (!report.empty()) log_info("{}", report);  // the report says "warning:" itself
  log_info("kd-prepare: wrote {}", path);
}

}  // namespace

std::string default_kd_logits_path(const std::string& data_path, int64_t k) {
  return fmt::format("{}.kd-top{}.safetensors", data_path, k);
}

void run_kd_prepare(const Config& cfg) {
  const std::string teacher_dir = cfg.get_string("kd.teacher");
  if (teacher_dir.empty())
    fail("config key 'kd.teacher' must be set: the model whose logits kd-prepare stores");
  if (cfg.get_string("data.train").empty()) fail("config key 'data.train' must be set");
  const int64_t top_k = cfg.get_int("kd.top_k");
  if (top_k < 1) fail("config key 'kd.top_k' must be at least 1");
  const int64_t batch_size = cfg.get_int("trainer.micro_batch_size");
  if (batch_size < 1) fail("config key 'trainer.micro_batch_size' must be at least 1");
  auto ctx = init_run(cfg);
  if (ctx.dist.world_size() > 1 || process_tensor_parallel())
    fail("kd-prepare runs as one process: start it without aligner launch (and trainer.tensor_parallel=1)");
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  const Transformer teacher = load_transformer(teacher_dir, ctx.device, dtype);
  // sft tokenizes with the student's tokenizer; the teacher's stands in for it when none is named.
  const std::string tok_dir =
      cfg.get_string("model.path").empty() ? teacher_dir : cfg.get_string("model.path");
  const auto tok = load_tokenizer(tok_dir);
  if (tok->vocab_size() > teacher.cfg.vocab_size)
    fail("{}: the tokenizer has {} tokens but the teacher {} has a vocabulary of {}", tok_dir,
         tok->vocab_size(), teacher_dir, teacher.cfg.vocab_size);
  const auto opt = read_data_options(cfg, teacher.cfg);
  const auto tmpl = resolve_chat_template(cfg.get_string("data.template"), *tok);
  const int64_t k = std::min(top_k, teacher.cfg.vocab_size);
  for (const auto& [data_key, logits_key] :
       {std::pair{"data.train", "kd.logits"}, std::pair{"data.validation", "kd.validation_logits"}}) {
    const std::string data = cfg.get_string(data_key);
    if (data.empty()) continue;
    std::string path = cfg.get_string(logits_key);
    if (path.empty()) path = default_kd_logits_path(data, k);
    auto ds = open_sft_dataset(data, *tok, tmpl, opt);
    check_and_describe(ds, data_key);
    write_topk(path, ds, teacher, teacher_dir, k, batch_size, pad_id_for(*tok), ctx.device);
  }
}

StoredTopK StoredTopK::open(const std::string& path, const SftDataset& ds, const std::string& split,
                            int64_t top_k, int64_t vocab) {
  if (!std::filesystem::exists(path))
    fail("{}: no such file (aligner kd-prepare writes it for {}={} with this config)", path, split,
         ds.file.path());
  StoredTopK s;
  s.file_ = safetensors::File::open(path);
  const auto& meta = s.file_.metadata();
  auto get = [&](const std::string& key) -> const std::string& {
    auto it = meta.find(key);
    if (it == meta.end())
      fail("{}: not a logits file written by aligner kd-prepare (its metadata has no '{}')", path, key);
    return it->second;
  };
  if (get("format") != kFormat)
    fail("{}: not a logits file written by aligner kd-prepare (format '{}')", path, get("format"));
  const Metadata now = data_identity(ds);
  if (get("data_lines") != now.at("data_lines") || get("data_bytes") != now.at("data_bytes") ||
      get("data_fnv1a64") != now.at("data_fnv1a64")) {
    const bool same_size =
        get("data_lines") == now.at("data_lines") && get("data_bytes") == now.at("data_bytes");
    fail(
        "{}: holds teacher logits for {} ({} lines, {} bytes), not for this run's {}={} ({} lines, {} "
        "bytes{})",
        path, get("data"), get("data_lines"), get("data_bytes"), split, ds.file.path(), now.at("data_lines"),
        now.at("data_bytes"), same_size ? ", other content" : "");
  }
  for (const char* key : kSettings)
    if (get(key) != now.at(key))
      fail("{}: made with {}={}, but this run has {}={} (run aligner kd-prepare with this run's settings)",
           path, key, get(key), key, now.at(key));
  if (get("vocab_size") != std::to_string(vocab))
    fail("{}: made by teacher {} with a vocabulary of {}, but the student's is {}", path, get("teacher"),
         get("vocab_size"), vocab);

  s.offsets_ = s.file_.get("offsets");
  s.ids_ = s.file_.get("ids");
  s.targets_ = s.file_.get("targets");
  s.values_ = s.file_.get("values");
  const int64_t records = ds.file.size();
  if (s.offsets_.dim() != 1 || s.offsets_.size(0) != records + 1 || s.offsets_.scalar_type() != at::kLong ||
      s.ids_.dim() != 2 || s.ids_.scalar_type() != at::kInt || s.values_.sizes() != s.ids_.sizes() ||
      !at::isFloatingType(s.values_.scalar_type()) || s.targets_.dim() != 1 ||
      s.targets_.size(0) != s.ids_.size(0) || s.targets_.scalar_type() != at::kInt)
    fail("{}: its tensors do not have the shapes and dtypes kd-prepare writes", path);
  const int64_t* o = s.offsets_.data_ptr<int64_t>();
  for (int64_t e = 0; e < records; ++e)
    if (o[e] > o[e + 1]) fail("{}: offsets decrease at example {}", path, e);
  if (o[0] != 0 || o[records] != s.ids_.size(0))
    fail("{}: offsets do not span the {} stored rows", path, s.ids_.size(0));
  s.stored_k_ = s.ids_.size(1);
  s.top_k_ = std::min(top_k, vocab);
  if (s.top_k_ > s.stored_k_)
    fail("{}: holds the teacher's top {} logits per token, but kd.top_k={} asks for more", path, s.stored_k_,
         top_k);
  log_info("{}: distilling from the stored top {} of {} logits per token of teacher {}", path, s.top_k_,
           s.stored_k_, get("teacher"));
  return s;
}

std::pair<at::Tensor, at::Tensor> StoredTopK::rows(int64_t index, const Sequence& seq,
                                                   const std::string& where) const {
  const int64_t begin = offsets_.data_ptr<int64_t>()[index];
  const int64_t n = offsets_.data_ptr<int64_t>()[index + 1] - begin;
  const auto want = loss_targets(seq);
  if (n != int64_t(want.size()) ||
      !std::equal(want.begin(), want.end(), targets_.data_ptr<int32_t>() + begin))
    fail(
        "{}: its tokens differ from those {} was made from ({} loss tokens there, {} now): another "
        "tokenizer?",
        where, file_.path(), n, want.size());
  return {values_.narrow(0, begin, n).narrow(1, 0, top_k_).to(at::kFloat),
          ids_.narrow(0, begin, n).narrow(1, 0, top_k_).to(at::kLong)};
}

}  // namespace aligner
