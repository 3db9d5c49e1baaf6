#include "io/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace st = aligner::safetensors;
namespace fs = std::filesystem;

namespace {

class Safetensors : public testing::Test {
 protected:
  void SetUp() override {
    const auto* info = testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    dir_ = fs::path(testing::TempDir()) / ("aligner_st_" + name + "_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char(v >> (8 * i));
  return out;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A file as the Python library lays it out: length, header, data.
void write_safetensors(const std::string& path, const std::string& header, const std::string& data) {
  write_bytes(path, le64(header.size()) + header + data);
}

std::string floats(std::initializer_list<float> values) {
  std::string out(values.size() * sizeof(float), '\0');
  std::memcpy(out.data(), values.begin(), out.size());
  return out;
}

// Bit-exact comparison: NaN payloads and -0.0 must survive too.
void expect_same_bits(const at::Tensor& expected, const at::Tensor& actual, const std::string& name) {
  SCOPED_TRACE(name);
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type());
  ASSERT_EQ(actual.sizes(), expected.sizes());
  at::Tensor e = expected.contiguous(), a = actual.contiguous();
  ASSERT_EQ(a.nbytes(), e.nbytes());
  if (e.numel() > 0) {
    EXPECT_EQ(std::memcmp(a.data_ptr(), e.data_ptr(), e.nbytes()), 0);
  }
}

// Runs `f`, which must throw aligner::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no aligner::Error thrown; expected one mentioning " << parts.front();
  } catch (const aligner::Error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

st::NamedTensors every_dtype() {
  at::manual_seed(7);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  at::Tensor special = at::tensor({0.0f, -0.0f, inf, -inf, nan, 1e-40f, 3.5f}, at::kFloat);
  return {
      {"f64", at::randn({3, 4}, at::kDouble)},
      {"f32", at::randn({2, 3, 5})},
      {"f32_special", special},
      {"f16", at::randn({7}).to(at::kHalf)},
      {"bf16", at::randn({4, 3}).to(at::kBFloat16)},
      {"i64", at::tensor({std::numeric_limits<int64_t>::min(), int64_t(-1), int64_t(0),
                          std::numeric_limits<int64_t>::max()},
                         at::kLong)},
      {"i32", at::randint(-100000, 100000, {5}, at::kInt)},
      {"i16", at::randint(-30000, 30000, {2, 2}, at::kShort)},
      {"i8", at::randint(-128, 128, {9}, at::kChar)},
      {"u8", at::randint(0, 256, {3, 3}, at::kByte)},
      {"bool", at::randint(0, 2, {11}, at::kByte).to(at::kBool)},
      {"scalar_f32", at::scalar_tensor(2.5, at::kFloat)},
      {"scalar_bf16", at::scalar_tensor(-1.5, at::kBFloat16)},
      {"scalar_bool", at::scalar_tensor(true, at::kBool)},
      {"empty_f32", at::empty({0}, at::kFloat)},
      {"empty_i64", at::empty({2, 0, 3}, at::kLong)},
      {"transposed", at::arange(12, at::kFloat).reshape({3, 4}).t()},
  };
}

TEST_F(Safetensors, RoundTripEveryDtype) {
  const auto tensors = every_dtype();
  st::save(path("all.safetensors"), tensors);
  auto f = st::File::open(path("all.safetensors"));

  ASSERT_EQ(f.tensors().size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, expected] = tensors[i];
    EXPECT_EQ(f.tensors()[i].name, name) << "tensors() lists the file in save order";
    ASSERT_TRUE(f.contains(name));
    EXPECT_EQ(f.info(name).dtype, expected.scalar_type());
    expect_same_bits(expected, f.get(name), name);
  }
  EXPECT_EQ(f.info("f32_special").shape, (std::vector<int64_t>{7}));
  EXPECT_EQ(f.info("scalar_f32").shape, std::vector<int64_t>{});
  EXPECT_EQ(f.get("scalar_f32").item<float>(), 2.5f);
  EXPECT_EQ(f.get("scalar_bf16").item<float>(), -1.5f);
  EXPECT_TRUE(f.get("scalar_bool").item<bool>());
  EXPECT_TRUE(at::equal(f.get("transposed"), at::arange(12, at::kFloat).reshape({3, 4}).t()));
  EXPECT_EQ(f.info("empty_i64").begin, f.info("empty_i64").end);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
}

TEST_F(Safetensors, ConsecutiveOffsetsAndPaddedHeader) {
  st::save(path("x.safetensors"), {{"a", at::zeros({3}, at::kByte)}, {"b", at::zeros({2}, at::kFloat)}});
  const std::string bytes = read_bytes(path("x.safetensors"));
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 3 + 8);
  auto f = st::File::open(path("x.safetensors"));
  EXPECT_EQ(f.info("a").begin, 0u);
  EXPECT_EQ(f.info("a").end, 3u);
  EXPECT_EQ(f.info("b").begin, 3u);
  EXPECT_EQ(f.info("b").end, 11u);
}

TEST_F(Safetensors, GetSharesTheMappingAndOutlivesFile) {
  st::save(path("m.safetensors"), {{"w", at::arange(6, at::kFloat)}});
  at::Tensor t;
  {
    auto f = st::File::open(path("m.safetensors"));
    t = f.get("w");
    EXPECT_EQ(f.get("w").data_ptr(), t.data_ptr()) << "get() must view the mapping, not copy";
  }
  fs::remove(path("m.safetensors"));
  EXPECT_TRUE(at::equal(t, at::arange(6, at::kFloat)));
}

TEST_F(Safetensors, MetadataRoundTrip) {
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "1200"}, {"note", "a \"q\" b"}};
  st::save(path("meta.safetensors"), {{"x", at::ones({2})}}, meta);
  EXPECT_EQ(st::File::open(path("meta.safetensors")).metadata(), meta);

  st::save(path("none.safetensors"), {{"x", at::ones({2})}}, {});
  EXPECT_TRUE(st::File::open(path("none.safetensors")).metadata().empty());
}

// Bytes written by hand exactly as huggingface's safetensors library writes them.
TEST_F(Safetensors, ReadsPythonLayout) {
  write_safetensors(path("py.safetensors"), R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                    floats({1.0f, 2.0f}));
  auto f = st::File::open(path("py.safetensors"));
  ASSERT_EQ(f.tensors().size(), 1u);
  const auto& info = f.info("a");
  EXPECT_EQ(info.dtype, at::kFloat);
  EXPECT_EQ(info.shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(info.begin, 0u);
  EXPECT_EQ(info.end, 8u);
  at::Tensor a = f.get("a");
  ASSERT_EQ(a.sizes(), (std::vector<int64_t>{2}));
  EXPECT_EQ(a[0].item<float>(), 1.0f);
  EXPECT_EQ(a[1].item<float>(), 2.0f);
  EXPECT_TRUE(f.metadata().empty());

  // Padded header, metadata, and a little-endian bf16 scalar (0x3FC0 = 1.5).
  write_safetensors(
      path("bf16.safetensors"),
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[],"data_offsets":[0,2]}}   )",
      std::string("\xC0\x3F", 2));
  auto g = st::File::open(path("bf16.safetensors"));
  EXPECT_EQ(g.metadata().at("format"), "pt");
  at::Tensor w = g.get("w");
  EXPECT_EQ(w.dim(), 0);
  EXPECT_EQ(w.scalar_type(), at::kBFloat16);
  EXPECT_EQ(w.item<float>(), 1.5f);
}

TEST_F(Safetensors, WritesPythonLayout) {
  st::save(path("w.safetensors"), {{"a", at::tensor({1.0f, 2.0f})}}, {});
  EXPECT_EQ(
      read_bytes(path("w.safetensors")),
      le64(56) + R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})" + "  " + floats({1.0f, 2.0f}));
  EXPECT_FALSE(fs::exists(path("w.safetensors.tmp")));
}

TEST_F(Safetensors, UnalignedTensorIsCopied) {
  // The f32 starts at data byte 1: not 4-aligned, so it cannot be viewed in place.
  const std::string header =
      R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  write_safetensors(path("u.safetensors"), padded, "\x07" + floats({-3.25f, 1e30f}));
  auto f = st::File::open(path("u.safetensors"));
  at::Tensor t = f.get("f");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % 4, 0u);
  EXPECT_EQ(t[0].item<float>(), -3.25f);
  EXPECT_EQ(t[1].item<float>(), 1e30f);
  EXPECT_EQ(f.get("b").item<uint8_t>(), 7);
}

TEST_F(Safetensors, SaveOverwritesAtomically) {
  st::save(path("o.safetensors"), {{"x", at::ones({100})}});
  st::save(path("o.safetensors"), {{"y", at::zeros({2})}});
  auto f = st::File::open(path("o.safetensors"));
  EXPECT_FALSE(f.contains("x"));
  EXPECT_TRUE(at::equal(f.get("y"), at::zeros({2})));
  EXPECT_FALSE(fs::exists(path("o.safetensors.tmp")));
}

TEST_F(Safetensors, SaveRejectsDuplicateNames) {
  expect_error(
      [&] {
        st::save(path("d.safetensors"), {{"x", at::ones({1})}, {"x", at::ones({2})}});
      },
      {path("d.safetensors"), "'x'", "twice"});
  EXPECT_FALSE(fs::exists(path("d.safetensors")));
  expect_error(
      [&] {
        st::save_dir(path("dd"), {{"x", at::ones({1})}, {"x", at::ones({2})}}, 4);
      },
      {path("dd"), "'x'", "twice"});
}

TEST_F(Safetensors, DtypeStrings) {
  const std::vector<std::pair<std::string, at::ScalarType>> all = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},   {"I32", at::kInt},   {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},    {"BOOL", at::kBool}};
  for (const auto& [s, t] : all) {
    EXPECT_EQ(st::dtype_from_string(s), t) << s;
    EXPECT_EQ(st::dtype_to_string(t), s) << s;
  }
  expect_error([] { st::dtype_from_string("f32"); }, {"'f32'"});
  expect_error([] { st::dtype_to_string(at::kComplexFloat); }, {"safetensors"});
}

// --- malformed files ---

TEST_F(Safetensors, MissingFile) {
  expect_error([&] { st::File::open(path("nope.safetensors")); }, {path("nope.safetensors"), "No such file"});
}

TEST_F(Safetensors, ShorterThanEightBytes) {
  write_bytes(path("short.safetensors"), std::string("\x02\0\0\0", 4));
  expect_error([&] { st::File::open(path("short.safetensors")); }, {path("short.safetensors"), "4 bytes"});
}

TEST_F(Safetensors, HeaderLengthPastEndOfFile) {
  write_bytes(path("long.safetensors"), le64(1000) + "{}");
  expect_error([&] { st::File::open(path("long.safetensors")); },
               {path("long.safetensors"), "header length 1000"});
}

TEST_F(Safetensors, TensorNotFound) {
  st::save(path("t.safetensors"), {{"x", at::ones({1})}});
  auto f = st::File::open(path("t.safetensors"));
  EXPECT_FALSE(f.contains("y"));
  expect_error([&] { f.get("y"); }, {path("t.safetensors"), "'y'"});
  expect_error([&] { f.info("y"); }, {path("t.safetensors"), "'y'"});
}

struct BadHeader {
  std::string name;
  std::string header;
  size_t data_bytes;
  std::vector<std::string> expect;  // besides the file name
};

void PrintTo(const BadHeader& c, std::ostream* os) {
  *os << c.name;
}

class MalformedHeader : public Safetensors, public testing::WithParamInterface<BadHeader> {};

TEST_P(MalformedHeader, ErrorNamesFileAndTensor) {
  const BadHeader& c = GetParam();
  const std::string file = path(c.name + ".safetensors");
  write_safetensors(file, c.header, std::string(c.data_bytes, '\0'));
  auto parts = c.expect;
  parts.push_back(file);
  expect_error([&] { st::File::open(file); }, parts);
}

INSTANTIATE_TEST_SUITE_P(
    Safetensors, MalformedHeader,
    testing::Values(
        BadHeader{"not_json", R"({"a": {"dtype": )", 0, {"header: invalid JSON"}},
        BadHeader{"empty_header", "", 0, {"header: invalid JSON"}},
        // Deep enough to overflow the stack of a recursive walk, were it parsed.
        BadHeader{"deeply_nested",
                  R"({"__metadata__":)" + std::string(100000, '[') + std::string(100000, ']') + "}",
                  0,
                  {"header: JSON nested deeper than 256 levels"}},
        BadHeader{"not_object", R"([1, 2])", 0, {"not a JSON object"}},
        BadHeader{"entry_not_object", R"({"a": 5})", 0, {"'a'", "not an object"}},
        BadHeader{"missing_dtype", R"({"a":{"shape":[1],"data_offsets":[0,4]}})", 4, {"'a'", "\"dtype\""}},
        BadHeader{"missing_shape", R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", 4, {"'a'", "\"shape\""}},
        BadHeader{"missing_offsets", R"({"a":{"dtype":"F32","shape":[1]}})", 4, {"'a'", "\"data_offsets\""}},
        BadHeader{"unknown_dtype",
                  R"({"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}})",
                  4,
                  {"'a'", "unknown dtype 'Q4'"}},
        BadHeader{"negative_shape",
                  R"({"a":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})",
                  0,
                  {"'a'", "negative shape [2,-1]"}},
        BadHeader{"fractional_shape",
                  R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})",
                  4,
                  {"'a'", "not integers"}},
        BadHeader{"end_before_begin",
                  R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})",
                  8,
                  {"'a'", "[8, 4]", "end before"}},
        BadHeader{"offsets_not_pair",
                  R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
                  4,
                  {"'a'", "not [begin, end]"}},
        BadHeader{"byte_count",
                  R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                  8,
                  {"'a'", "hold 8 bytes", "needs 12"}},
        BadHeader{"past_end",
                  R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                  4,
                  {"'a'", "past the end", "(4 bytes)"}},
        BadHeader{"overlap",
                  R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                  12,
                  {"'a'", "'b'", "overlap"}},
        BadHeader{"gap",
                  R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                  R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                  12,
                  {"'b'", "gap of 4 bytes"}},
        BadHeader{"trailing_bytes",
                  R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                  8,
                  {"has 8 bytes", "end at byte 4"}},
        BadHeader{"metadata_not_strings", R"({"__metadata__":{"step":3}})", 0, {"__metadata__", "'step'"}}),
    [](const testing::TestParamInfo<BadHeader>& info) { return info.param.name; });

// --- folders ---

st::NamedTensors five_tensors() {
  // 40 + 40 + 40 + 100 + 8 bytes.
  return {{"a", at::arange(10, at::kFloat)},
          {"b", at::arange(10, at::kInt) - 5},
          {"c", at::full({5}, 3.0, at::kDouble)},
          {"d", at::arange(50, at::kShort).reshape({5, 10})},
          {"e", at::scalar_tensor(-7, at::kLong)}};
}

TEST_F(Safetensors, ShardedSaveAndOpenDir) {
  const auto tensors = five_tensors();
  const std::string dir = path("model");
  st::save_dir(dir, tensors, 80);

  // Greedy in order: [a b] fills 80 exactly, [c] (c+d > 80), [d] alone (100 > 80), [e].
  const nlohmann::json index = nlohmann::json::parse(read_bytes(dir + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 228);
  const nlohmann::json expected_map = {{"a", "model-00001-of-00004.safetensors"},
                                       {"b", "model-00001-of-00004.safetensors"},
                                       {"c", "model-00002-of-00004.safetensors"},
                                       {"d", "model-00003-of-00004.safetensors"},
                                       {"e", "model-00004-of-00004.safetensors"}};
  EXPECT_EQ(index["weight_map"], expected_map);
  for (int i = 1; i <= 4; ++i)
    EXPECT_TRUE(fs::exists(dir + "/model-0000" + std::to_string(i) + "-of-00004.safetensors")) << i;
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  EXPECT_EQ(st::File::open(dir + "/model-00001-of-00004.safetensors").tensors().size(), 2u);

  auto ckpt = st::Checkpoint::open_dir(dir);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b", "c", "d", "e"}));
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(ckpt.contains(name));
    EXPECT_EQ(ckpt.info(name).shape, t.sizes().vec());
    expect_same_bits(t, ckpt.get(name), name);
  }
  expect_error([&] { ckpt.get("zz"); }, {dir, "'zz'"});
}

TEST_F(Safetensors, SingleFileSaveDirAndLayoutSwitch) {
  const auto tensors = five_tensors();
  const std::string dir = path("model");
  st::save_dir(dir, tensors, 100);
  fs::path extra_shard = fs::path(dir) / "model-00009-of-00009.safetensors";
  write_bytes(extra_shard.string(), "stale");

  // Fits: one file, and every file of the sharded layout is gone.
  st::save_dir(dir, tensors, 1000);
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().filename().string());
  EXPECT_EQ(files, std::vector<std::string>{"model.safetensors"});
  auto ckpt = st::Checkpoint::open_dir(dir);
  EXPECT_EQ(ckpt.names().size(), 5u);
  for (const auto& [name, t] : tensors) expect_same_bits(t, ckpt.get(name), name);

  // And back: sharding removes model.safetensors.
  st::save_dir(dir, tensors, 50);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  EXPECT_TRUE(fs::exists(dir + "/model-00005-of-00005.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/model-00004-of-00004.safetensors"));
  for (const auto& [name, t] : tensors) expect_same_bits(t, st::Checkpoint::open_dir(dir).get(name), name);

  // No limit: one file however large.
  st::save_dir(dir, tensors, 0);
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
}

TEST_F(Safetensors, OpenDirErrors) {
  const std::string dir = path("model");
  fs::create_directories(dir);
  expect_error([&] { st::Checkpoint::open_dir(dir); },
               {"no model.safetensors or model.safetensors.index.json in " + dir});

  st::save_dir(dir, five_tensors(), 100);
  const std::string index = dir + "/model.safetensors.index.json";
  const std::string shard3 = dir + "/model-00003-of-00004.safetensors";

  fs::rename(shard3, shard3 + ".moved");
  expect_error([&] { st::Checkpoint::open_dir(dir); }, {shard3, index, "does not exist"});
  fs::rename(shard3 + ".moved", shard3);

  // The index claims "c" lives in shard 3, which holds only "d".
  nlohmann::json j = nlohmann::json::parse(read_bytes(index));
  j["weight_map"]["c"] = "model-00003-of-00004.safetensors";
  write_bytes(index, j.dump());
  expect_error([&] { st::Checkpoint::open_dir(dir); }, {shard3, index, "'c'"});

  write_bytes(index, "{\"weight_map\": 3}");
  expect_error([&] { st::Checkpoint::open_dir(dir); }, {index, "weight_map"});

  write_bytes(index, std::string(100000, '[') + std::string(100000, ']'));
  expect_error([&] { st::Checkpoint::open_dir(dir); }, {index, "nested deeper than 256 levels"});
}

// A model folder is untrusted: the names its index holds must not lead out of it.
TEST_F(Safetensors, IndexNamesOnlyFilesInsideTheFolder) {
  const std::string dir = path("model");
  st::save_dir(dir, five_tensors(), 100);
  const std::string index = dir + "/model.safetensors.index.json";
  const nlohmann::json good = nlohmann::json::parse(read_bytes(index));
  write_safetensors(path("outside.safetensors"), "{}", "");
  fs::create_directories(dir + "/sub");
  fs::create_symlink("../../outside.safetensors", dir + "/sub/link.safetensors");

  const std::vector<std::string> bad = {"../outside.safetensors",    "../../../../../../etc/passwd",
                                        path("outside.safetensors"), "sub/../../outside.safetensors",
                                        "sub/link.safetensors",      ""};
  for (const std::string& shard : bad) {
    nlohmann::json j = good;
    j["weight_map"]["c"] = shard;
    write_bytes(index, j.dump());
    expect_error([&] { st::Checkpoint::open_dir(dir); }, {index, "weight_map entry 'c'", "'" + shard + "'"});
  }
  write_bytes(index, good.dump());
  EXPECT_EQ(st::Checkpoint::open_dir(dir).names().size(), 5u);

  // The index itself, or the one weights file, as a symlink out of the folder.
  fs::remove(index);
  fs::create_symlink("../outside.safetensors", index);
  expect_error([&] { st::Checkpoint::open_dir(dir); }, {dir, "model.safetensors.index.json", "symlink"});
  const std::string single = path("single");
  fs::create_directories(single);
  fs::create_symlink("../outside.safetensors", single + "/model.safetensors");
  expect_error([&] { st::Checkpoint::open_dir(single); }, {single, "model.safetensors", "symlink"});
}

// The Hugging Face cache's snapshot folders hold links to ../../blobs: those are allowed.
TEST_F(Safetensors, HuggingFaceCacheSnapshotLinksAreAllowed) {
  const fs::path repo = dir_ / "hub" / "models--org--tiny";
  const fs::path snapshot = repo / "snapshots" / "0123abcd";
  fs::create_directories(repo / "blobs");
  fs::create_directories(snapshot);
  st::save(path("hub/models--org--tiny/blobs/5f3a"), five_tensors());
  fs::create_symlink("../../blobs/5f3a", snapshot / "model.safetensors");
  const auto ckpt = st::Checkpoint::open_dir(snapshot.string());
  for (const auto& [name, t] : five_tensors()) expect_same_bits(t, ckpt.get(name), name);
}

}  // namespace
