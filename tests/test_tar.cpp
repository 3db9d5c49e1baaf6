// Tar archives (io/tar.h) and the prompt sources built on them (io/prompt_source.h): archives made
// here byte by byte, so every header field is under the test's control, and archives made by
// Python's tarfile (tests/fixtures/webdataset) in each of its formats.
#include "io/tar.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "io/jsonl.h"
#include "io/prompt_source.h"
#include "test_util.h"
#include "tiny_diffusion.h"

namespace aligner {
namespace {

namespace fs = std::filesystem;
using test::error_of;

struct Entry {
  std::string name;
  std::string data;
  char type = '0';
  std::string prefix;      // the ustar prefix field
  bool gnu = false;        // GNU's magic ("ustar  \0"), whose headers have no prefix field
  std::string size_field;  // written instead of the data's octal size when set
};

void put(std::string& block, size_t at, const std::string& s) {
  block.replace(at, s.size(), s);
}

std::string octal(uint64_t v, int digits) {
  return fmt::format("{:0{}o}", v, digits);
}

std::string header(const Entry& e) {
  std::string h(512, '\0');
  put(h, 0, e.name);
  put(h, 100, "0000644");
  put(h, 108, "0000000");
  put(h, 116, "0000000");
  put(h, 124, e.size_field.empty() ? octal(e.data.size(), 11) : e.size_field);
  put(h, 136, octal(1700000000, 11));
  put(h, 148, "        ");
  h[156] = e.type;
  put(h, 257,
      e.gnu ? std::string("ustar  \0", 8)
            : std::string("ustar\0"
                          "00",
                          8));
  put(h, 345, e.prefix);
  unsigned sum = 0;
  for (char c : h) sum += static_cast<unsigned char>(c);
  put(h, 148, octal(sum, 6) + std::string("\0 ", 2));
  return h;
}

std::string padded(std::string data) {
  data.resize((data.size() + 511) / 512 * 512, '\0');
  return data;
}

// The archive of `entries`, closed by its two zero blocks unless `closed` is false.
std::string archive(const std::vector<Entry>& entries, bool closed = true) {
  std::string out;
  for (const auto& e : entries) out += header(e) + padded(e.data);
  if (closed) out += std::string(1024, '\0');
  return out;
}

Entry gnu_long_name(const std::string& name) {
  return {"././@LongLink", name + std::string(1, '\0'), 'L', "", true};
}

// One pax record: its length counts itself.
std::string pax_record(const std::string& key, const std::string& value) {
  const std::string body = " " + key + "=" + value + "\n";
  size_t len = body.size() + 1;
  while (std::to_string(len).size() + body.size() != len) ++len;
  return std::to_string(len) + body;
}

std::string write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
  return path.string();
}

std::vector<std::string> names(const tar::File& f) {
  std::vector<std::string> out;
  for (const auto& m : f.members()) out.push_back(m.name);
  return out;
}

const fs::path kFixtures = fs::path(test::kRoot) / "tests" / "fixtures" / "webdataset";
const std::string kLongFolder =
    "prompts/a-very-long-folder-name-a-very-long-folder-name-a-very-long-folder-name-a-very-long-folder-name-"
    "a-very-long-folder-name-x";

TEST(Tar, MembersWithPrefixLongNamesAndPaxHeaders) {
  const auto dir = test::temp_dir("tar_members");
  const std::string long_name = std::string(150, 'n') + "/" + std::string(80, 'm') + ".txt";
  const std::string pax =
      pax_record("path", "pax/named.txt") + pax_record("size", "5") + pax_record("mtime", "1.5");
  const auto path = write_file(dir / "a.tar", archive({
                                                  {"a.txt", "hello"},
                                                  {"d/", "", '5'},
                                                  {"b.txt", "prefixed", '0', "some/dir"},
                                                  {"link", "", '2'},
                                                  gnu_long_name(long_name),
                                                  {"trunc", "long", '0', "", true},
                                                  {"PaxHeaders/x", pax, 'x'},
                                                  {"ignored", "12345", '0', "", false, octal(0, 11)},
                                                  {"old-dir/", "", '\0'},
                                                  {"empty.bin", ""},
                                              }));
  // The pax member's header says size 0; its data still follows, as pax's size record says.
  const tar::File f(path);
  EXPECT_EQ(names(f),
            (std::vector<std::string>{"a.txt", "some/dir/b.txt", long_name, "pax/named.txt", "empty.bin"}));
  EXPECT_EQ(f.read(f.members()[0]), "hello");
  EXPECT_EQ(f.read(f.members()[1]), "prefixed");
  EXPECT_EQ(f.read(f.members()[2]), "long");
  EXPECT_EQ(f.read(f.members()[3]), "12345");
  EXPECT_EQ(f.read(f.members()[4]), "");
  EXPECT_EQ(f.members()[0].offset, 0u);
  EXPECT_EQ(f.members()[1].offset, 1536u);  // a.txt (2 blocks), the directory (no data)
  EXPECT_EQ(f.members()[2].offset, 3072u);  // at its long-name entry; the symlink before has no data
}

TEST(Tar, PythonTarfileFormats) {
  for (const char* format : {"ustar", "gnu", "pax"}) {
    SCOPED_TRACE(format);
    const std::string path = (kFixtures / (std::string(format) + ".tar")).string();
    const tar::File f(path);
    std::vector<std::string> expected = {kLongFolder + "/00000.txt", kLongFolder + "/00000.jpg", "00001.txt"};
    std::vector<std::string> prompts = {"a red circle", "a blue square"};
    if (std::string(format) == "pax") {
      expected.push_back("prompts/caf\u00e9.txt");
      prompts.push_back("un caf\u00e9 cr\u00e8me");
    }
    EXPECT_EQ(names(f), expected);
    EXPECT_EQ(f.read(f.members()[1]), "\xff\xd8 not a real jpeg");
    EXPECT_EQ(read_prompts(path, "prompt"), prompts);
  }
}

TEST(Tar, BadHeadersAreErrorsNamingFileAndOffset) {
  const auto dir = test::temp_dir("tar_bad");
  const std::string good = archive({{"a.txt", "hello"}, {"b.txt", "world"}});
  // A rejected file's descriptor is closed: a fuzzer or a long run would otherwise run out of them.
  const auto open_files = [] {
    return std::distance(fs::directory_iterator("/proc/self/fd"), fs::directory_iterator());
  };
  const auto files_before = open_files();

  std::string bytes = good;
  bytes[1024 + 3] ^= 1;  // b.txt's name, under its checksum
  auto path = write_file(dir / "checksum.tar", bytes);
  auto msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find(path + ": header at offset 1024: checksum"), std::string::npos) << msg;

  path = write_file(dir / "truncated.tar", good.substr(0, 2048 + 100));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find(path + ": truncated"), std::string::npos) << msg;

  path = write_file(dir / "one_zero_block.tar", good.substr(0, 2048 + 512));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find("one zero block at offset 2048"), std::string::npos) << msg;

  path = write_file(dir / "unclosed.tar", archive({{"a.txt", "hello"}}, false));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find("without the two zero blocks"), std::string::npos) << msg;

  path = write_file(dir / "past_end.tar",
                    archive({{"a.txt", "hello"}, {"big", "x", '0', "", false, octal(100000, 11)}}));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find(path + ": member at offset 1024: size 100000 runs past the end"), std::string::npos)
      << msg;

  path = write_file(dir / "octal.tar", archive({{"a.txt", "hello", '0', "", false, "0000000009 "}}));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find("header at offset 0: size field is not octal"), std::string::npos) << msg;

  path = write_file(dir / "pax.tar", archive({{"PaxHeaders/x", "99 path=a\n", 'x'}, {"a.txt", "x"}}));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find("pax header at offset 0: malformed record"), std::string::npos) << msg;

  path = write_file(dir / "dangling.tar", archive({gnu_long_name("a-long-name.txt")}));
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find("extended header at offset 0 is followed by the end"), std::string::npos) << msg;

  // Compressed bytes everywhere, the checksum field's too (what gzip makes of a tar file).
  std::string gzip(512, '\x9c');
  gzip[0] = '\x1f', gzip[1] = '\x8b';
  path = write_file(dir / "shard.tar", gzip);
  msg = error_of([&] { tar::File{path}; });
  EXPECT_NE(msg.find("a compressed file"), std::string::npos) << msg;
  // Binary in a numeric field is shown escaped: the error stays on one line.
  std::string binary(512, '\n');
  path = write_file(dir / "binary.tar", binary);
  msg = error_of([&] { tar::File{path}; });
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_NE(msg.find("\\x0a"), std::string::npos) << msg;

  msg = error_of([&] { tar::File{(dir / "missing.tar").string()}; });
  EXPECT_NE(msg.find("missing.tar: cannot open"), std::string::npos) << msg;
  EXPECT_EQ(open_files(), files_before);
}

TEST(Prompts, BraceExpansionKeepsZeroPadding) {
  using V = std::vector<std::string>;
  EXPECT_EQ(expand_braces("d/shard-{000..003}.tar"),
            (V{"d/shard-000.tar", "d/shard-001.tar", "d/shard-002.tar", "d/shard-003.tar"}));
  EXPECT_EQ(expand_braces("{8..11}"), (V{"8", "9", "10", "11"}));
  EXPECT_EQ(expand_braces("{09..11}"), (V{"09", "10", "11"}));
  EXPECT_EQ(expand_braces("{3..1}"), (V{"3", "2", "1"}));
  EXPECT_EQ(expand_braces("{a,b}-{0..1}.tar"), (V{"a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"}));
  EXPECT_EQ(expand_braces("plain.tar"), (V{"plain.tar"}));
  EXPECT_NE(error_of([] { expand_braces("s-{1..2.tar"); }).find("never closed"), std::string::npos);
  EXPECT_NE(error_of([] { expand_braces("s-1}.tar"); }).find("closes no"), std::string::npos);
  EXPECT_NE(error_of([] { expand_braces("s-{{1..2}}.tar"); }).find("nested"), std::string::npos);
  EXPECT_NE(error_of([] { expand_braces("s-{abc}.tar"); }).find("neither a range"), std::string::npos);
  EXPECT_NE(error_of([] { expand_braces("s-{0..99999999}.tar"); }).find("more than"), std::string::npos);
}

// Two samples per shard: each a txt and a jpg member.
std::string shard(int i) {
  std::vector<Entry> entries;
  for (int k = 0; k < 2; ++k) {
    const std::string key = fmt::format("{:05d}", 2 * i + k);
    entries.push_back({key + ".jpg", "jpeg bytes"});
    entries.push_back({key + ".txt", fmt::format("prompt {}\n", 2 * i + k)});
  }
  return archive(entries);
}

TEST(Prompts, ShardsFoldersPatternsAndLists) {
  const auto dir = test::temp_dir("prompts_shards");
  for (int i : {2, 0, 1}) write_file(dir / fmt::format("shard-{:06d}.tar", i), shard(i));
  write_file(dir / "notes.md", "not a shard");
  const std::vector<std::string> all = {"prompt 0", "prompt 1", "prompt 2",
                                        "prompt 3", "prompt 4", "prompt 5"};
  EXPECT_EQ(read_prompts(dir.string(), "prompt"), all);
  EXPECT_EQ(read_prompts((dir / "shard-{000000..000002}.tar").string(), "prompt"), all);
  EXPECT_EQ(read_prompts((dir / "shard-000001.tar").string(), "prompt"),
            (std::vector<std::string>{"prompt 2", "prompt 3"}));

  // JSONL as before, alone or in a '::' list with shards.
  const auto jsonl = write_file(dir / "p.jsonl", "{\"text\": \"from jsonl\"}\n{\"text\": \"second\"}\n");
  EXPECT_EQ(read_prompts(jsonl, "text"), read_string_field(jsonl, "text"));
  EXPECT_EQ(
      read_prompts(jsonl + "::" + (dir / "shard-00000{2,0}.tar").string(), "text"),
      (std::vector<std::string>{"from jsonl", "second", "prompt 4", "prompt 5", "prompt 0", "prompt 1"}));

  auto msg = error_of([&] { read_prompts((dir / "shard-{000000..000003}.tar").string(), "prompt"); });
  EXPECT_NE(msg.find("shard '" + (dir / "shard-000003.tar").string() + "'"), std::string::npos) << msg;
  msg = error_of([&] { read_prompts(jsonl + "::", "text"); });
  EXPECT_NE(msg.find("empty entry"), std::string::npos) << msg;
  msg = error_of([&] { read_prompts((dir / "data.tar.gz").string(), "text"); });
  EXPECT_NE(msg.find("compressed"), std::string::npos) << msg;
  const auto empty_dir = dir / "empty";
  fs::create_directories(empty_dir);
  msg = error_of([&] { read_prompts(empty_dir.string(), "text"); });
  EXPECT_NE(msg.find("without .tar shards"), std::string::npos) << msg;
}

TEST(Prompts, SamplesGroupedAsWebdatasetDoes) {
  const auto dir = test::temp_dir("prompts_samples");
  // __meta__ names and names without an extension are skipped; extensions are lowercased; the key
  // is the name up to the first dot of its last component.
  const auto path = write_file(dir / "s.tar", archive({{"__key__", "meta"},
                                                       {"README", "no extension"},
                                                       {"a/00000.seg.png", "png"},
                                                       {"a/00000.TXT", "upper case"},
                                                       {"v1.0/00001.txt", "dotted folder\t \n"},
                                                       {"00002.json", "{}"},
                                                       {"00002.txt", "caf\xc3\xa9"}}));
  EXPECT_EQ(read_prompts(path, "prompt"),
            (std::vector<std::string>{"upper case", "dotted folder", "caf\u00e9"}));

  auto msg = error_of([&] {
    read_prompts(
        write_file(dir / "notxt.tar", archive({{"00000.txt", "a"}, {"00001.jpg", "x"}, {"00001.cls", "3"}})),
        "prompt");
  });
  EXPECT_NE(msg.find("notxt.tar: sample '00001' (member at offset 1024) has no txt member"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("00001.jpg, 00001.cls"), std::string::npos) << msg;

  msg = error_of([&] {
    read_prompts(write_file(dir / "blank.tar", archive({{"00000.txt", "a"}, {"00001.txt", " \r\n"}})),
                 "prompt");
  });
  EXPECT_NE(msg.find("blank.tar: member '00001.txt' at offset 1024: the prompt is empty"), std::string::npos)
      << msg;

  msg = error_of([&] {
    read_prompts(write_file(dir / "utf8.tar", archive({{"00000.txt", "ab\xff"}})), "prompt");
  });
  EXPECT_NE(msg.find("utf8.tar: member '00000.txt' at offset 0: the prompt is not valid UTF-8 (byte 2)"),
            std::string::npos)
      << msg;

  msg = error_of([&] {
    read_prompts(write_file(dir / "dup.tar", archive({{"00000.txt", "a"}, {"00000.TXT", "b"}})), "prompt");
  });
  EXPECT_NE(msg.find("dup.tar: member '00000.TXT' at offset 1024: sample '00000' already has"),
            std::string::npos)
      << msg;

  msg = error_of([&] { read_prompts(write_file(dir / "none.tar", archive({{"README", "x"}})), "prompt"); });
  EXPECT_NE(msg.find("no samples"), std::string::npos) << msg;
}

// draftp reads its prompts from shards as NeMo-Aligner's DRaFT+ does: training runs on a pattern of
// shards, validation on Python's pax archive.
TEST(Prompts, DraftpTrainsOnWebdatasetShards) {
  const auto dir = test::temp_dir("prompts_draftp");
  for (int i : {0, 1}) write_file(dir / fmt::format("shard-{:06d}.tar", i), shard(i));
  const auto r = test::run_aligner(fmt::format(
      "draftp --model {} data.train={} data.validation={} reward.kind=redness infer.height=16 infer.width=16 "
      "infer.inference_steps=2 trainer.max_steps=1 trainer.global_batch_size=2 trainer.micro_batch_size=2 "
      "lora.rank=2 output_dir={}",
      test::tiny_diffusion_model(11).string(), (dir / "shard-{000000..000001}.tar").string(),
      (kFixtures / "pax.tar").string(), (dir / "run").string()));
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir / "run" / "final" / "pytorch_lora_weights.safetensors")) << r.output;
  const auto bad =
      test::run_aligner(fmt::format("draftp --model {} data.train={} reward.kind=redness output_dir={}",
                                    test::tiny_diffusion_model(11).string(),
                                    (dir / "shard-{000000..000002}.tar").string(), (dir / "bad").string()));
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("shard-000002.tar"), std::string::npos) << bad.output;
}

}  // namespace
}  // namespace aligner
