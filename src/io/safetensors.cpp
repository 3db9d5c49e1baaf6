#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "core/error.h"
#include "core/json.h"

namespace aligner::safetensors {

namespace fs = std::filesystem;
using nlohmann::json;

struct Mapping {
  const uint8_t* base = nullptr;
  size_t size = 0;
  const uint8_t* data = nullptr;  // start of the data section, inside [base, base + size]

  Mapping(const uint8_t* base, size_t size) : base(base), size(size) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { munmap(const_cast<uint8_t*>(base), size); }
};

at::ScalarType dtype_from_string(const std::string& s) {
  static const std::map<std::string, at::ScalarType, std::less<>> kTypes = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  auto it = kTypes.find(s);
  if (it == kTypes.end()) fail("unknown safetensors dtype '{}'", s);
  return it->second;
}

std::string dtype_to_string(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return "F64";
    case at::kFloat:
      return "F32";
    case at::kHalf:
      return "F16";
    case at::kBFloat16:
      return "BF16";
    case at::kLong:
      return "I64";
    case at::kInt:
      return "I32";
    case at::kShort:
      return "I16";
    case at::kChar:
      return "I8";
    case at::kByte:
      return "U8";
    case at::kBool:
      return "BOOL";
    default:
      fail("dtype {} cannot be stored in safetensors", c10::toString(t));
  }
}

namespace {

// Field checks for one header entry; every message names the file and the tensor.
TensorInfo parse_entry(const std::string& path, const std::string& name,
                       const nlohmann::ordered_json& entry) {
  if (!entry.is_object()) fail("{}: tensor '{}': header entry is not an object", path, name);
  TensorInfo t;
  t.name = name;

  auto dtype = entry.find("dtype");
  if (dtype == entry.end()) fail("{}: tensor '{}': missing \"dtype\"", path, name);
  if (!dtype->is_string()) fail("{}: tensor '{}': \"dtype\" is not a string", path, name);
  const auto& dtype_name = dtype->get_ref<const std::string&>();
  try {
    t.dtype = dtype_from_string(dtype_name);
  } catch (const Error&) {
    fail("{}: tensor '{}': unknown dtype '{}'", path, name, dtype_name);
  }

  auto shape = entry.find("shape");
  if (shape == entry.end()) fail("{}: tensor '{}': missing \"shape\"", path, name);
  if (!shape->is_array()) fail("{}: tensor '{}': \"shape\" is not an array", path, name);
  size_t numel = 1;
  t.shape.reserve(shape->size());
  for (const auto& d : *shape) {
    if (!d.is_number_integer()) fail("{}: tensor '{}': shape {} is not integers", path, name, shape->dump());
    if (!d.is_number_unsigned()) fail("{}: tensor '{}': negative shape {}", path, name, shape->dump());
    uint64_t v = d.get<uint64_t>();
    if (v > uint64_t(INT64_MAX) || __builtin_mul_overflow(numel, size_t(v), &numel))
      fail("{}: tensor '{}': shape {} is too large", path, name, shape->dump());
    t.shape.push_back(int64_t(v));
  }

  auto offsets = entry.find("data_offsets");
  if (offsets == entry.end()) fail("{}: tensor '{}': missing \"data_offsets\"", path, name);
  if (!offsets->is_array() || offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
      !(*offsets)[1].is_number_unsigned())
    fail("{}: tensor '{}': \"data_offsets\" {} is not [begin, end]", path, name, offsets->dump());
  t.begin = (*offsets)[0].get<size_t>();
  t.end = (*offsets)[1].get<size_t>();
  if (t.end < t.begin)
    fail("{}: tensor '{}': data_offsets [{}, {}] end before they begin", path, name, t.begin, t.end);

  size_t nbytes;
  if (__builtin_mul_overflow(numel, c10::elementSize(t.dtype), &nbytes) || nbytes != t.end - t.begin)
    fail("{}: tensor '{}': data_offsets [{}, {}] hold {} bytes but {} {} needs {}", path, name, t.begin,
         t.end, t.end - t.begin, dtype_name, shape->dump(), numel * c10::elementSize(t.dtype));
  return t;
}

// Raises errno as an aligner::Error naming `what`.
[[noreturn]] void fail_errno(const std::string& what, const std::string& path) {
  fail("{}: {}: {}", path, what, std::strerror(errno));
}

// Like std::ofstream, but reports errors (including those only fsync sees), and only the final
// rename makes the new contents visible under `path`.
class AtomicWriter {
 public:
  explicit AtomicWriter(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    file_ = std::fopen(tmp_.c_str(), "wb");
    if (!file_) fail_errno("cannot create " + tmp_, path_);
  }
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;
  ~AtomicWriter() {
    if (file_) {
      std::fclose(file_);
      std::remove(tmp_.c_str());
    }
  }

  void write(const void* data, size_t n) {
    if (n > 0 && std::fwrite(data, 1, n, file_) != n) fail_errno("write failed", path_);
  }

  void commit() {
    // fsync before rename: otherwise a crash can leave an empty file under the final name.
    bool ok = std::fflush(file_) == 0 && fsync(fileno(file_)) == 0;
    ok = (std::fclose(file_) == 0) && ok;
    file_ = nullptr;
    if (!ok || std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      int err = errno;
      std::remove(tmp_.c_str());
      errno = err;
      fail_errno("write failed", path_);
    }
  }

 private:
  std::string path_, tmp_;
  std::FILE* file_ = nullptr;
};

using Iter = NamedTensors::const_iterator;

void check_names(Iter first, Iter last, const std::string& where) {
  std::set<std::string_view> seen;
  for (auto it = first; it != last; ++it) {
    if (it->first == "__metadata__") fail("{}: '__metadata__' cannot be a tensor name", where);
    if (!seen.insert(it->first).second) fail("{}: tensor '{}' is given twice", where, it->first);
    if (!it->second.defined()) fail("{}: tensor '{}' is undefined", where, it->first);
  }
}

size_t nbytes_of(const at::Tensor& t) {
  return size_t(t.numel()) * t.element_size();
}

void write_file(const std::string& path, Iter first, Iter last,
                const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the header in data order, as the Python library writes it.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (auto it = first; it != last; ++it) {
    const at::Tensor& t = it->second;
    size_t n = nbytes_of(t);
    auto& entry = header[it->first];
    entry["dtype"] = dtype_to_string(t.scalar_type());
    entry["shape"] = t.sizes().vec();
    entry["data_offsets"] = {offset, offset + n};
    offset += n;
  }
  std::string text = header.dump();
  // Padding to a multiple of 8 keeps the data section aligned for every dtype.
  text.append((8 - text.size() % 8) % 8, ' ');

  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  AtomicWriter out(path);
  out.write(len, sizeof len);
  out.write(text.data(), text.size());
  // One tensor at a time, so that saving a GPU model never holds a second copy of it on the host.
  for (auto it = first; it != last; ++it) {
    at::Tensor t = it->second.cpu().contiguous();
    out.write(t.data_ptr(), nbytes_of(t));
  }
  out.commit();
}

// "model-00001-of-00003.safetensors"
bool is_shard_name(const std::string& s) {
  auto digits = [&](size_t pos) {
    return std::all_of(s.begin() + pos, s.begin() + pos + 5, [](char c) { return c >= '0' && c <= '9'; });
  };
  return s.size() == 32 && s.compare(0, 6, "model-") == 0 && digits(6) && s.compare(11, 4, "-of-") == 0 &&
         digits(15) && s.compare(20, 12, ".safetensors") == 0;
}

// Whether `path` is `root` or lies under it, comparing whole components.
bool within(const fs::path& path, const fs::path& root) {
  auto p = path.begin();
  for (const auto& part : root) {
    if (p == path.end() || *p != part) return false;
    ++p;
  }
  return true;
}

// `name` as a file of the model folder `dir`. A model folder is untrusted input: an absolute name, a
// ".." or a symlink that leads out of the folder would make us open files elsewhere. Symlinks into
// the Hugging Face cache's blobs/ are allowed, since a cache snapshot folder
// (models--org--name/snapshots/REV/) holds nothing but links to ../../blobs/. Errors start with
// `where`.
fs::path file_in_folder(const fs::path& dir, const std::string& name, const std::string& where) {
  const fs::path rel(name);
  if (name.empty() || rel.is_absolute())
    fail("{}: '{}' is not a file name inside {}", where, name, dir.string());
  for (const auto& part : rel)
    if (part == "..") fail("{}: '{}' leads outside {} (\"..\")", where, name, dir.string());
  const fs::path path = dir / rel;
  std::error_code ec;
  const fs::path real = fs::canonical(path, ec);
  if (ec) return path;  // missing: the caller's error names it
  const fs::path real_dir = fs::canonical(dir, ec);
  if (ec) fail("{}: cannot resolve {}: {}", where, dir.string(), ec.message());
  const fs::path cache_blobs = real_dir.parent_path().parent_path() / "blobs";
  if (within(real, real_dir) ||
      (real_dir.parent_path().filename() == "snapshots" && within(real, cache_blobs)))
    return path;
  fail("{}: '{}' is a symlink to {}, outside {}", where, name, real.string(), dir.string());
}

}  // namespace

File File::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail_errno("cannot open safetensors file", path);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    errno = err;
    fail_errno("cannot stat", path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path);
  }
  size_t size = size_t(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail("{}: file is {} bytes, too short for a safetensors header", path, size);
  }
  void* addr = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping keeps the file open
  if (addr == MAP_FAILED) {
    errno = err;
    fail_errno("mmap failed", path);
  }

  File f;
  f.path_ = path;
  f.mapping_ = std::make_shared<Mapping>(static_cast<const uint8_t*>(addr), size);
  const uint8_t* base = f.mapping_->base;

  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(base[i]) << (8 * i);
  if (header_len > size - 8)
    fail("{}: header length {} is larger than the file ({} bytes)", path, header_len, size);
  const char* header_begin = reinterpret_cast<const char*>(base + 8);
  f.mapping_->data = base + 8 + header_len;
  const size_t data_size = size - 8 - header_len;

  // Ordered, so that tensors at the same offset (empty ones) keep the order they were written in.
  const nlohmann::ordered_json header =
      parse_ordered_json(std::string_view(header_begin, header_len), path + ": header");
  if (!header.is_object()) fail("{}: header is not a JSON object", path);

  f.tensors_.reserve(header.size());
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) fail("{}: \"__metadata__\" is not an object", path);
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) fail("{}: \"__metadata__\" value for '{}' is not a string", path, key);
        f.metadata_.emplace(key, value.get<std::string>());
      }
      continue;
    }
    TensorInfo t = parse_entry(path, name, entry);
    if (t.end > data_size)
      fail("{}: tensor '{}': data_offsets [{}, {}] run past the end of the data section ({} bytes)", path,
           name, t.begin, t.end, data_size);
    f.tensors_.push_back(std::move(t));
  }

  // In file order the tensors must tile the data section exactly, as the Python library checks.
  std::stable_sort(f.tensors_.begin(), f.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  size_t expected = 0;
  for (size_t i = 0; i < f.tensors_.size(); ++i) {
    const TensorInfo& t = f.tensors_[i];
    if (t.begin < expected)
      fail("{}: tensors '{}' and '{}' overlap (bytes [{}, {}) and [{}, {}))", path, f.tensors_[i - 1].name,
           t.name, f.tensors_[i - 1].begin, f.tensors_[i - 1].end, t.begin, t.end);
    if (t.begin > expected)
      fail("{}: tensor '{}': gap of {} bytes before its data_offsets [{}, {}]", path, t.name,
           t.begin - expected, t.begin, t.end);
    expected = t.end;
    f.index_.emplace(t.name, i);
  }
  if (expected != data_size)
    fail("{}: data section has {} bytes but the tensors end at byte {}", path, data_size, expected);
  return f;
}

bool File::contains(const std::string& name) const {
  return index_.count(name) != 0;
}

const TensorInfo& File::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("{}: no tensor named '{}'", path_, name);
  return tensors_[it->second];
}

at::Tensor File::get(const std::string& name) const {
  const TensorInfo& t = info(name);
  auto options = at::TensorOptions().dtype(t.dtype);
  if (t.begin == t.end) return at::empty(t.shape, options);
  const uint8_t* p = mapping_->data + t.begin;
  if (reinterpret_cast<uintptr_t>(p) % c10::elementSize(t.dtype) != 0) {
    at::Tensor out = at::empty(t.shape, options);
    std::memcpy(out.data_ptr(), p, t.end - t.begin);
    return out;
  }
  // The deleter's capture keeps the mapping alive as long as the tensor's storage.
  return at::from_blob(
      const_cast<uint8_t*>(p), t.shape, [mapping = mapping_](void*) {}, options);
}

void save(const std::string& path, const NamedTensors& tensors,
          const std::map<std::string, std::string>& metadata) {
  check_names(tensors.begin(), tensors.end(), path);
  write_file(path, tensors.begin(), tensors.end(), metadata);
}

Checkpoint Checkpoint::open_dir(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  const fs::path root(dir);
  const std::string index_path = file_in_folder(root, "model.safetensors.index.json", dir).string();
  const std::string single_path = file_in_folder(root, "model.safetensors", dir).string();

  if (fs::exists(index_path)) {
    const json index = read_json_file(index_path);
    auto map = index.is_object() ? index.find("weight_map") : index.end();
    if (map == index.end() || !map->is_object()) fail("{}: no \"weight_map\" object", index_path);

    std::map<std::string, size_t> shard_index;
    for (const auto& [name, shard] : map->items()) {
      if (!shard.is_string()) fail("{}: weight_map entry for '{}' is not a string", index_path, name);
      const auto& shard_name = shard.get_ref<const std::string&>();
      auto [it, added] = shard_index.emplace(shard_name, c.files_.size());
      const std::string shard_path =
          file_in_folder(root, shard_name, fmt::format("{}: weight_map entry '{}'", index_path, name))
              .string();
      if (added) {
        if (!fs::exists(shard_path)) fail("{}: shard listed in {} does not exist", shard_path, index_path);
        c.files_.push_back(File::open(shard_path));
      }
      if (!c.files_[it->second].contains(name))
        fail("{}: no tensor '{}', though {} lists it there", shard_path, name, index_path);
      c.where_.emplace(name, it->second);
    }
    return c;
  }
  if (!fs::exists(single_path)) fail("no model.safetensors or model.safetensors.index.json in {}", dir);
  c.files_.push_back(File::open(single_path));
  for (const auto& t : c.files_[0].tensors()) c.where_.emplace(t.name, 0);
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

bool Checkpoint::contains(const std::string& name) const {
  return where_.count(name) != 0;
}

const TensorInfo& Checkpoint::info(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: no tensor named '{}' in the checkpoint", dir_, name);
  return files_[it->second].info(name);
}

at::Tensor Checkpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) fail("{}: no tensor named '{}' in the checkpoint", dir_, name);
  return files_[it->second].get(name);
}

void save_dir(const std::string& dir, const NamedTensors& tensors, int64_t max_shard_bytes) {
  check_names(tensors.begin(), tensors.end(), dir);
  const fs::path root(dir);
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) fail("{}: cannot create directory: {}", dir, ec.message());

  size_t total = 0;
  for (const auto& [name, t] : tensors) total += nbytes_of(t);
  const bool sharded = max_shard_bytes > 0 && total > size_t(max_shard_bytes);

  // The index goes first: open_dir prefers it, so a stale one would shadow model.safetensors.
  std::vector<fs::path> stale = {root / "model.safetensors.index.json"};
  if (sharded) stale.push_back(root / "model.safetensors");
  for (const auto& entry : fs::directory_iterator(root, ec))
    if (is_shard_name(entry.path().filename().string())) stale.push_back(entry.path());
  for (const auto& p : stale) {
    fs::remove(p, ec);
    if (ec) fail("{}: cannot remove stale weights: {}", p.string(), ec.message());
  }

  if (!sharded) {
    write_file((root / "model.safetensors").string(), tensors.begin(), tensors.end(), {{"format", "pt"}});
    return;
  }

  // Greedy, in order: a tensor larger than the limit gets a shard of its own.
  std::vector<size_t> starts = {0};
  size_t filled = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    size_t n = nbytes_of(tensors[i].second);
    if (i > starts.back() && filled + n > size_t(max_shard_bytes)) {
      starts.push_back(i);
      filled = 0;
    }
    filled += n;
  }
  starts.push_back(tensors.size());

  const size_t shards = starts.size() - 1;
  json weight_map = json::object();
  for (size_t s = 0; s < shards; ++s) {
    const std::string name = fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, shards);
    auto first = tensors.begin() + starts[s], last = tensors.begin() + starts[s + 1];
    write_file((root / name).string(), first, last, {{"format", "pt"}});
    for (auto it = first; it != last; ++it) weight_map[it->first] = name;
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", std::move(weight_map)}};
  const std::string text = index.dump(2) + "\n";
  AtomicWriter out((root / "model.safetensors.index.json").string());
  out.write(text.data(), text.size());
  out.commit();
}

}  // namespace aligner::safetensors
