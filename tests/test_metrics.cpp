// The trainer's outputs: TensorBoard event files, metrics.jsonl, progress lines and log lines.
#include <gtest/gtest.h>

#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/progress.h"
#include "core/tensorboard.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;

// A fresh, empty directory under the test's temporary directory.
std::string fresh_dir(const std::string& name) {
  fs::path dir = fs::path(testing::TempDir()) / ("metrics_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> event_files(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// ---- A reader for what TensorBoardWriter writes, independent of its encoder. ----

uint64_t read_le(std::string_view bytes, size_t offset, int width) {
  if (offset + width > bytes.size()) throw std::runtime_error("truncated fixed-width field");
  uint64_t v = 0;
  for (int i = 0; i < width; ++i) v |= uint64_t(static_cast<unsigned char>(bytes[offset + i])) << (8 * i);
  return v;
}

// TFRecord framing, with both CRCs checked.
std::vector<std::string> read_records(const std::string& path) {
  std::string file = read_file(path);
  std::vector<std::string> records;
  size_t pos = 0;
  while (pos < file.size()) {
    uint64_t length = read_le(file, pos, 8);
    EXPECT_EQ(read_le(file, pos + 8, 4), mask_crc32c(crc32c(std::string_view(file).substr(pos, 8))))
        << "length CRC of record " << records.size();
    if (pos + 12 + length + 4 > file.size()) throw std::runtime_error("truncated record");
    std::string data = file.substr(pos + 12, length);
    EXPECT_EQ(read_le(file, pos + 12 + length, 4), mask_crc32c(crc32c(data)))
        << "data CRC of record " << records.size();
    records.push_back(data);
    pos += 12 + length + 4;
  }
  return records;
}

struct Field {
  uint32_t number;
  uint32_t wire_type;
  uint64_t value;     // varint, or the bits of a fixed-width field
  std::string bytes;  // length-delimited
};

std::vector<Field> decode_message(std::string_view data) {
  size_t pos = 0;
  auto varint = [&] {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= data.size()) throw std::runtime_error("truncated varint");
      auto byte = static_cast<unsigned char>(data[pos++]);
      v |= uint64_t(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return v;
    }
    throw std::runtime_error("varint too long");
  };
  std::vector<Field> fields;
  while (pos < data.size()) {
    uint64_t key = varint();
    Field f{uint32_t(key >> 3), uint32_t(key & 7), 0, {}};
    switch (f.wire_type) {
      case 0:
        f.value = varint();
        break;
      case 1:
        f.value = read_le(data, pos, 8);
        pos += 8;
        break;
      case 2: {
        uint64_t n = varint();
        if (pos + n > data.size()) throw std::runtime_error("truncated bytes field");
        f.bytes = std::string(data.substr(pos, n));
        pos += n;
        break;
      }
      case 5:
        f.value = read_le(data, pos, 4);
        pos += 4;
        break;
      default:
        throw std::runtime_error("unexpected wire type " + std::to_string(f.wire_type));
    }
    fields.push_back(f);
  }
  return fields;
}

struct Event {
  double wall_time = -1;
  int64_t step = -1;  // -1: field absent
  std::string file_version;
  std::vector<std::pair<std::string, float>> values;
  struct Image {
    std::string tag;
    int64_t height = 0, width = 0, colorspace = 0;
    std::string encoded;
  };
  std::vector<Image> images;
};

Event decode_event(const std::string& data) {
  Event e;
  for (const Field& f : decode_message(data)) {
    if (f.number == 1 && f.wire_type == 1) {
      std::memcpy(&e.wall_time, &f.value, 8);
    } else if (f.number == 2 && f.wire_type == 0) {
      e.step = static_cast<int64_t>(f.value);
    } else if (f.number == 3 && f.wire_type == 2) {
      e.file_version = f.bytes;
    } else if (f.number == 5 && f.wire_type == 2) {
      for (const Field& value : decode_message(f.bytes)) {
        EXPECT_EQ(value.number, 1u);
        std::pair<std::string, float> tv;
        std::optional<Event::Image> image;
        for (const Field& vf : decode_message(value.bytes)) {
          if (vf.number == 1 && vf.wire_type == 2) {
            tv.first = vf.bytes;
          } else if (vf.number == 2 && vf.wire_type == 5) {
            auto bits = static_cast<uint32_t>(vf.value);
            std::memcpy(&tv.second, &bits, 4);
          } else if (vf.number == 4 && vf.wire_type == 2) {
            image.emplace();
            for (const Field& f : decode_message(vf.bytes)) {
              if (f.number == 1 && f.wire_type == 0)
                image->height = int64_t(f.value);
              else if (f.number == 2 && f.wire_type == 0)
                image->width = int64_t(f.value);
              else if (f.number == 3 && f.wire_type == 0)
                image->colorspace = int64_t(f.value);
              else if (f.number == 4 && f.wire_type == 2)
                image->encoded = f.bytes;
              else
                ADD_FAILURE() << "unexpected Image field " << f.number;
            }
          } else {
            ADD_FAILURE() << "unexpected Summary.Value field " << vf.number;
          }
        }
        if (image) {
          image->tag = tv.first;
          e.images.push_back(*image);
        } else {
          e.values.push_back(tv);
        }
      }
    } else {
      ADD_FAILURE() << "unexpected Event field " << f.number << " of wire type " << f.wire_type;
    }
  }
  return e;
}

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// ---- TensorBoard ----

TEST(TensorBoard, Crc32cKnownValues) {
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);  // the standard CRC-32C check value
  EXPECT_EQ(crc32c(""), 0u);
  EXPECT_EQ(mask_crc32c(0xE3069283u), 0xC78AB0E5u);
  EXPECT_EQ(mask_crc32c(0), 0xA282EAD8u);
}

TEST(TensorBoard, WritesVersionThenScalarEventsThatDecodeBack) {
  std::string dir = fresh_dir("tb_roundtrip");
  double before = unix_now();
  TensorBoardWriter writer(dir);
  writer.add_scalars(1, {{"train/loss", 2.5}, {"train/lr", 1e-4}});
  writer.add_scalars(2, {});  // nothing to write: no event
  writer.add_scalars(300, {{"train/loss", -0.125}, {"eval/accuracy_µ", 0.1}});
  writer.add_scalars(int64_t(1) << 40, {{"train/loss", 1e30}});
  double after = unix_now();

  // Everything is on disk while the writer is still open, as a killed run would leave it.
  ASSERT_EQ(event_files(dir), std::vector<std::string>{writer.path()});
  std::vector<std::string> records = read_records(writer.path());
  ASSERT_EQ(records.size(), 4u);

  Event version = decode_event(records[0]);
  EXPECT_EQ(version.file_version, "brain.Event:2");
  EXPECT_EQ(version.step, 0);
  EXPECT_GE(version.wall_time, before - 1e-3);
  EXPECT_LE(version.wall_time, after + 1e-3);
  EXPECT_TRUE(version.values.empty());

  Event e1 = decode_event(records[1]);
  EXPECT_EQ(e1.step, 1);
  EXPECT_TRUE(e1.file_version.empty());
  EXPECT_GE(e1.wall_time, before - 1e-3);
  EXPECT_LE(e1.wall_time, after + 1e-3);
  using Values = std::vector<std::pair<std::string, float>>;
  EXPECT_EQ(e1.values, (Values{{"train/loss", 2.5f}, {"train/lr", 1e-4f}}));

  Event e2 = decode_event(records[2]);
  EXPECT_EQ(e2.step, 300);  // a two-byte varint
  EXPECT_EQ(e2.values, (Values{{"train/loss", -0.125f}, {"eval/accuracy_µ", 0.1f}}));

  Event e3 = decode_event(records[3]);
  EXPECT_EQ(e3.step, int64_t(1) << 40);
  EXPECT_EQ(e3.values, (Values{{"train/loss", 1e30f}}));
}

TEST(TensorBoard, ImagesDecodeBack) {
  std::string dir = fresh_dir("tb_image");
  TensorBoardWriter writer(dir);
  const std::string png = std::string("\x89PNG\r\n\x1a\n\0", 9) + " and the rest";
  writer.add_image(7, "validation/images", png, 64, 128, 3);
  const auto records = read_records(writer.path());
  ASSERT_EQ(records.size(), 2u);
  const Event e = decode_event(records[1]);
  EXPECT_EQ(e.step, 7);
  EXPECT_TRUE(e.values.empty());
  ASSERT_EQ(e.images.size(), 1u);
  EXPECT_EQ(e.images[0].tag, "validation/images");
  EXPECT_EQ(e.images[0].height, 64);
  EXPECT_EQ(e.images[0].width, 128);
  EXPECT_EQ(e.images[0].colorspace, 3);
  EXPECT_EQ(e.images[0].encoded, png);
}

TEST(TensorBoard, FileNameHasTimeAndHostAndDirectoryIsCreated) {
  std::string dir = fresh_dir("tb_name") + "/nested/run";
  auto before = static_cast<int64_t>(std::time(nullptr));
  TensorBoardWriter writer(dir);
  auto after = static_cast<int64_t>(std::time(nullptr));
  char host[256] = {};
  ASSERT_EQ(gethostname(host, sizeof host - 1), 0);
  std::smatch m;
  std::string name = fs::path(writer.path()).filename().string();
  ASSERT_TRUE(std::regex_match(name, m, std::regex(R"(events\.out\.tfevents\.(\d+)\.(.+))"))) << name;
  EXPECT_GE(std::stoll(m[1]), before);
  EXPECT_LE(std::stoll(m[1]), after);
  EXPECT_EQ(m[2], host);
  EXPECT_EQ(fs::path(writer.path()).parent_path(), fs::path(dir));
}

TEST(TensorBoard, SecondWriterInSameDirectoryKeepsFirstWritersEvents) {
  std::string dir = fresh_dir("tb_two");
  {
    TensorBoardWriter first(dir);
    first.add_scalars(1, {{"loss", 1.0}});
  }
  TensorBoardWriter second(dir);  // a resumed run, possibly within the same second
  second.add_scalars(2, {{"loss", 2.0}});
  std::vector<int64_t> steps;
  for (const std::string& file : event_files(dir)) {
    for (const std::string& record : read_records(file)) {
      Event e = decode_event(record);
      if (!e.values.empty()) steps.push_back(e.step);
    }
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2}));
}

TEST(TensorBoard, ThrowsWhenDirectoryCannotBeCreated) {
  std::string file = fresh_dir("tb_bad") + "/a_file";
  std::ofstream(file) << "x";
  EXPECT_THROW(TensorBoardWriter(file + "/sub"), Error);
}

// Writes events and the JSON of what they hold for scripts/check_tensorboard.py, which reads
// them with TensorBoard's own reader. ALIGNER_TB_OUT names the directory (it must not already
// hold event files); without it a temporary one is used and only this test's reader checks it.
TEST(TensorBoard, WritesCheckDirectoryForTensorBoardsReader) {
  const char* env = std::getenv("ALIGNER_TB_OUT");
  std::string dir = env && *env ? env : fresh_dir("tb_check");
  fs::create_directories(dir);
  ASSERT_TRUE(event_files(dir).empty()) << dir << " already holds event files; give an empty directory";

  nlohmann::json expected = nlohmann::json::object();
  {
    TensorBoardWriter writer(dir);
    for (int64_t step : {int64_t(0), int64_t(1), int64_t(2), int64_t(10), int64_t(1000), int64_t(1) << 40}) {
      std::vector<std::pair<std::string, double>> values{{"train/loss", 3.0 / double(step + 1)},
                                                         {"train/lr", 1e-4 * double(step % 7)},
                                                         {"train/neg", -1.5 * double(step % 5) - 1e-8}};
      if (step % 2 == 0) values.push_back({"eval/reward_µ", 123456.789 + double(step % 1000)});
      writer.add_scalars(step, values);
      for (const auto& [tag, value] : values) expected[tag].push_back({step, value});
    }
  }
  std::ofstream(fs::path(dir) / "expected.json") << expected.dump(2) << "\n";

  // Our own reading of the same file must agree with the JSON, at float precision.
  std::vector<std::string> files = event_files(dir);
  ASSERT_EQ(files.size(), 1u);
  nlohmann::json seen = nlohmann::json::object();
  for (const std::string& record : read_records(files[0])) {
    Event e = decode_event(record);
    for (const auto& [tag, value] : e.values) seen[tag].push_back({e.step, value});
  }
  ASSERT_EQ(seen.size(), expected.size());
  for (const auto& [tag, points] : expected.items()) {
    ASSERT_EQ(seen[tag].size(), points.size()) << tag;
    for (size_t i = 0; i < points.size(); ++i) {
      EXPECT_EQ(seen[tag][i][0].get<int64_t>(), points[i][0].get<int64_t>()) << tag;
      EXPECT_EQ(seen[tag][i][1].get<float>(), static_cast<float>(points[i][1].get<double>())) << tag;
    }
  }
}

// ---- metrics.jsonl ----

std::vector<nlohmann::json> read_rows(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

std::vector<int64_t> steps_of(const std::vector<nlohmann::json>& rows) {
  std::vector<int64_t> steps;
  for (const auto& row : rows) steps.push_back(row.value("step", int64_t(-1)));
  return steps;
}

TEST(MetricsLog, WritesOneObjectPerLineVisibleBeforeClose) {
  std::string path = fresh_dir("m_write") + "/sub/metrics.jsonl";  // parent created
  MetricsLog log(path, false);
  log.write({{"step", 1}, {"loss", 2.5}, {"text", "a\nb"}});
  log.write({{"step", 2}, {"loss", 2.25}});
  EXPECT_EQ(read_file(path), "{\"loss\":2.5,\"step\":1,\"text\":\"a\\nb\"}\n{\"loss\":2.25,\"step\":2}\n");
}

TEST(MetricsLog, RejectsNonObjectsAndReplacesInvalidUtf8) {
  std::string path = fresh_dir("m_bad") + "/metrics.jsonl";
  MetricsLog log(path, false);
  EXPECT_THROW(log.write(nlohmann::json::array({1, 2})), std::invalid_argument);
  log.write({{"sample", std::string("ok\xFF")}});
  EXPECT_EQ(read_file(path), "{\"sample\":\"ok\xEF\xBF\xBD\"}\n");
}

TEST(MetricsLog, AppendKeepsAndFreshStartTruncates) {
  std::string path = fresh_dir("m_append") + "/metrics.jsonl";
  { MetricsLog(path, false).write({{"step", 1}}); }
  { MetricsLog(path, true).write({{"step", 2}}); }
  EXPECT_EQ(steps_of(read_rows(path)), (std::vector<int64_t>{1, 2}));
  { MetricsLog(path, false).write({{"step", 7}}); }
  EXPECT_EQ(steps_of(read_rows(path)), (std::vector<int64_t>{7}));
}

TEST(MetricsLog, TruncateAfterDropsLaterRowsSoResumeHasNoDuplicates) {
  std::string path = fresh_dir("m_trunc") + "/metrics.jsonl";
  {
    MetricsLog log(path, false);
    for (int step = 1; step <= 5; ++step) {
      log.write({{"step", step}, {"loss", 1.0 / step}});
      if (step == 2) log.write({{"note", "no step"}});
    }
  }
  MetricsLog log(path, true);
  log.truncate_after(3);
  EXPECT_EQ(steps_of(read_rows(path)), (std::vector<int64_t>{1, 2, -1, 3}));
  log.write({{"step", 4}, {"loss", 0.3}});
  EXPECT_EQ(steps_of(read_rows(path)), (std::vector<int64_t>{1, 2, -1, 3, 4}));

  log.truncate_after(0);
  EXPECT_EQ(read_file(path), "");
  log.truncate_after(100);  // nothing to drop in an empty file
  log.write({{"step", 1}});
  EXPECT_EQ(steps_of(read_rows(path)), (std::vector<int64_t>{1}));
}

TEST(MetricsLog, TruncateAfterDropsTornLastLine) {
  std::string dir = fresh_dir("m_torn");
  for (const std::string& torn : {std::string("{\"step\": 3, \"lo"), std::string("{\"step\": 3}")}) {
    std::string path = dir + "/metrics.jsonl";
    std::ofstream(path, std::ios::binary) << "{\"step\": 1}\n{\"step\": 2}\n" << torn;  // no newline
    MetricsLog log(path, true);
    log.truncate_after(10);
    log.write({{"step", 3}});
    EXPECT_EQ(read_file(path), "{\"step\": 1}\n{\"step\": 2}\n{\"step\":3}\n") << torn;
  }
}

// Resuming rolls back by step number: a bad line in the middle (a torn write that a later run
// appended after, a hand edit) loses only itself, with a warning, never the rows after it.
TEST(MetricsLog, TruncateAfterKeepsRowsAfterABadLineAndWarns) {
  const std::string path = fresh_dir("m_bad_line") + "/metrics.jsonl";
  std::ofstream(path, std::ios::binary)
      << "{\"step\": 1}\n"
      << "{\"step\": 2, \"lo\n"
      << "{\"step\": 2}\n"
      << "[3]\n"
      << "{\"note\": \"after 2\"}\n"
      << std::string(100000, '[') << std::string(100000, ']') << "\n"
      << "{\"step\": 3}\n{\"step\": 4}\n{\"note\": \"after 4\"}\n{\"step\": 5}\n";
  std::vector<std::string> lines;
  LogSink previous = set_log_sink([&](const std::string& line) { lines.push_back(line); });
  {
    MetricsLog log(path, true);
    log.truncate_after(3);
    log.write({{"step", 4}});
  }
  set_log_sink(std::move(previous));
  EXPECT_EQ(read_file(path),
            "{\"step\": 1}\n{\"step\": 2}\n{\"note\": \"after 2\"}\n{\"step\": 3}\n{\"step\":4}\n");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("warning: " + path + ": dropped 3 line(s) that are not JSON objects: line 2, 4, 6"),
            std::string::npos)
      << lines[0];
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

// ---- Progress ----

TEST(Progress, FormatsDurations) {
  EXPECT_EQ(format_duration(0), "0s");
  EXPECT_EQ(format_duration(59.4), "59s");
  EXPECT_EQ(format_duration(59.6), "1m00s");
  EXPECT_EQ(format_duration(192), "3m12s");
  EXPECT_EQ(format_duration(3599), "59m59s");
  EXPECT_EQ(format_duration(3600), "1h00m");
  EXPECT_EQ(format_duration(2 * 3600 + 5 * 60 + 59), "2h05m");
  EXPECT_EQ(format_duration(3 * 86400 + 4 * 3600 + 59 * 60), "3d04h");
  EXPECT_EQ(format_duration(-1), "?");
  EXPECT_EQ(format_duration(std::nan("")), "?");
  EXPECT_EQ(format_duration(INFINITY), "?");
}

TEST(Progress, FormatsNumbers) {
  EXPECT_EQ(format_thousands(0), "0");
  EXPECT_EQ(format_thousands(999), "999");
  EXPECT_EQ(format_thousands(5432), "5,432");
  EXPECT_EQ(format_thousands(1234567), "1,234,567");
  EXPECT_EQ(format_thousands(-100000), "-100,000");
  EXPECT_EQ(format_thousands(INT64_MIN), "-9,223,372,036,854,775,808");

  EXPECT_EQ(format_metric("loss", 2.34564), "2.3456");
  EXPECT_EQ(format_metric("lr", 1e-4), "1.00e-04");
  EXPECT_EQ(format_metric("critic_lr", 3e-6), "3.00e-06");
  EXPECT_EQ(format_metric("lr", 0), "0.00e+00");
  EXPECT_EQ(format_metric("epoch", 2), "2");
  EXPECT_EQ(format_metric("reward", -0.0), "0");
  EXPECT_EQ(format_metric("tokens", 123456789), "123456789");
  EXPECT_EQ(format_metric("kl", 0.00012345), "1.234e-04");
  EXPECT_EQ(format_metric("grad_norm", 1234567.5), "1.235e+06");
  EXPECT_EQ(format_metric("loss", std::nan("")), "nan");
}

TEST(Progress, EtaUsesSecondIntervalThenPerStepSmoothing) {
  EtaEstimator eta(0, 100.0);
  EXPECT_LT(eta.eta_seconds(10), 0);  // unknown
  eta.record(1, 110.0);               // start-up: 10 s
  EXPECT_DOUBLE_EQ(eta.seconds_per_step(), 10.0);
  EXPECT_DOUBLE_EQ(eta.eta_seconds(10), 90.0);
  eta.record(3, 112.0);  // 1 s/step replaces the start-up estimate
  EXPECT_DOUBLE_EQ(eta.seconds_per_step(), 1.0);
  eta.record(3, 500.0);  // no progress: ignored
  EXPECT_DOUBLE_EQ(eta.seconds_per_step(), 1.0);
  eta.record(4, 115.0);  // one step of 3 s moves the average by 5%
  EXPECT_DOUBLE_EQ(eta.seconds_per_step(), 1.1);
  EXPECT_DOUBLE_EQ(eta.eta_seconds(10), 6 * 1.1);
  EXPECT_DOUBLE_EQ(eta.eta_seconds(4), 0);

  // Hearing of every step or of every 10th gives the same average.
  EtaEstimator each(0, 0.0), batched(0, 0.0);
  for (EtaEstimator* e : {&each, &batched}) {
    e->record(1, 5.0);
    e->record(2, 6.0);
  }
  for (int i = 1; i <= 10; ++i) each.record(2 + i, 6.0 + 2.0 * i);
  batched.record(12, 26.0);
  EXPECT_NEAR(each.seconds_per_step(), batched.seconds_per_step(), 1e-12);
  EXPECT_NEAR(batched.seconds_per_step(), 1.0 + (1 - std::pow(0.95, 10)), 1e-12);
}

TEST(Progress, LineFormats) {
  MetricValues values{{"kl", 0.0123}, {"lr", 1e-4}, {"loss", 2.3456}};
  EXPECT_EQ(progress_tty_line(12, 100, values, 5432.4, 192),
            "step 12/100 | loss 2.3456 | lr 1.00e-04 | 5,432 tok/s | ETA 3m12s | kl 0.0123");
  EXPECT_EQ(progress_log_line(12, 100, values, 5432.4, 192),
            "step 12/100 loss=2.3456 lr=1.00e-04 tok/s=5432 eta=3m12s kl=0.0123");
  EXPECT_EQ(progress_log_line(1, 100, {}, std::nan(""), -1), "step 1/100 tok/s=? eta=?");
  EXPECT_EQ(progress_tty_line(1, 100, {}, std::nan(""), -1), "step 1/100 | ? tok/s | ETA ?");
  // A step that counts no tokens (an image recipe) shows no speed.
  EXPECT_EQ(progress_log_line(3, 10, {{"reward", 0.5}}, 0.0, 5), "step 3/10 eta=5s reward=0.5000");
  EXPECT_EQ(progress_tty_line(3, 10, {}, 0.0, 5), "step 3/10 | ETA 5s");
}

TEST(Progress, LogOutputPrintsEveryIntervalAndTheLastStep) {
  std::ostringstream out;
  {
    Progress progress(12, /*is_tty=*/false, /*log_every=*/5, /*start_step=*/0, out);
    for (int64_t step = 1; step <= 12; ++step) progress.update(step, {{"loss", 1.0 / step}}, 1000);
    progress.message("saved checkpoint");
  }
  std::vector<std::string> lines;
  std::istringstream in(out.str());
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 4u) << out.str();
  std::regex line_re(R"(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] step (\d+)/12 loss=[0-9.]+ tok/s=1000 eta=\d+s)");
  std::smatch m;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(std::regex_match(lines[i], m, line_re)) << lines[i];
    EXPECT_EQ(m[1], std::vector<std::string>({"5", "10", "12"})[i]);
  }
  EXPECT_EQ(lines[3], "saved checkpoint");
  EXPECT_EQ(out.str().find('\r'), std::string::npos);
}

TEST(Progress, LogOutputFinishPrintsASkippedLastUpdate) {
  std::ostringstream out;
  Progress progress(100, false, 10, 40, out);  // resumed at step 40
  progress.update(43, {}, 1);
  EXPECT_EQ(out.str(), "");
  progress.finish();
  EXPECT_NE(out.str().find("] step 43/100 tok/s=1 eta="), std::string::npos) << out.str();
  progress.finish();
  std::string s = out.str();
  EXPECT_EQ(std::count(s.begin(), s.end(), '\n'), 1);
}

TEST(Progress, TerminalRedrawsOneLineAndKeepsMessagesAndLogsAboveIt) {
  std::vector<std::string> captured;
  LogSink previous = set_log_sink([&](const std::string& line) { captured.push_back(line); });
  std::ostringstream out;
  {
    Progress progress(10, /*is_tty=*/true, 1, 0, out);
    progress.update(1, {{"loss", 2.0}}, 10);
    progress.update(2, {{"loss", 1.5}}, 10);
    progress.message("hello");
    log_info("from the log {}", 7);
    progress.finish();
  }
  log_info("after");
  set_log_sink(std::move(previous));

  std::string s = out.str();
  std::string l1 = "step 1/10 | loss 2 | 10 tok/s | ETA ";
  std::string l2 = "step 2/10 | loss 1.5000 | 10 tok/s | ETA ";
  ASSERT_EQ(s.rfind("\r\033[K" + l1, 0), 0u) << s;
  size_t p2 = s.find("\r\033[K" + l2);
  ASSERT_NE(p2, std::string::npos) << s;
  // Each message: clear the live line, print the message, redraw the live line.
  std::smatch m;
  std::string tail = s.substr(p2);
  ASSERT_TRUE(std::regex_match(tail, m,
                               std::regex("\r\033\\[K(step 2/10[^\r\n]*)"
                                          "\r\033\\[Khello\n\r\033\\[K\\1"
                                          "\r\033\\[K\\[[-0-9: ]+\\] from the log 7\n\r\033\\[K\\1"
                                          "\n")))
      << tail;
  // Only while the Progress lived did log lines go to it.
  ASSERT_EQ(captured.size(), 1u);
  EXPECT_NE(captured[0].find("] after"), std::string::npos);
}

// ---- log ----

TEST(Log, TimestampsAndRankFilter) {
  std::tm tm{};
  tm.tm_year = 2026 - 1900;
  tm.tm_mon = 10;
  tm.tm_mday = 23;
  tm.tm_hour = 10;
  tm.tm_min = 0;
  tm.tm_sec = 5;
  tm.tm_isdst = -1;
  EXPECT_EQ(format_timestamp(std::mktime(&tm)), "2026-11-23 10:00:05");

  std::vector<std::string> lines;
  LogSink previous = set_log_sink([&](const std::string& line) { lines.push_back(line); });
  log_info("a {}", 1);
  set_log_rank(3);
  log_info("dropped");
  log_warn("dropped too");
  set_log_rank(3, /*all_ranks=*/true);
  log_warn("b {}", "x");
  set_log_rank(0);
  set_log_sink(std::move(previous));

  ASSERT_EQ(lines.size(), 2u);
  EXPECT_TRUE(std::regex_match(lines[0], std::regex(R"(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] a 1)")))
      << lines[0];
  EXPECT_TRUE(std::regex_match(lines[1], std::regex(R"(\[[-0-9: ]+\] \[rank 3\] warning: b x)"))) << lines[1];
}

}  // namespace
}  // namespace aligner
