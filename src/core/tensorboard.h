// TensorBoard event files, written directly: the format is a TFRecord file of serialized Event
// protobufs, and the few message fields that scalars need are encoded by hand, so neither
// TensorFlow nor protobuf is a dependency.
#pragma once
#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/crc32c.h"  // TFRecord checksums each record's length and data

namespace aligner {

// TFRecord stores CRCs rotated and offset, because a CRC of data that itself holds CRCs is weak.
uint32_t mask_crc32c(uint32_t crc);

class TensorBoardWriter {
 public:
  // Creates `dir` if needed and a new file "events.out.tfevents.<unix_seconds>.<hostname>" in it,
  // starting with the file-version event that readers expect first. A resumed run writes a new
  // file beside the old ones; TensorBoard's loader (purge_orphaned_data, its default) discards the
  // old file's points at or past the step where the new one restarts, so curves do not double back.
  explicit TensorBoardWriter(const std::string& dir);

  // One event holding all the values at `step`, handed to the OS before returning so that a run
  // that is killed keeps every step it logged. Values are stored as float, as TensorBoard does.
  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);

  // An image (TensorBoard's Images tab) at `step`: `png` holds an encoded PNG of height x width
  // pixels with `channels` colour channels (1 grey, 3 RGB, 4 RGBA).
  void add_image(int64_t step, const std::string& tag, const std::string& png, int64_t height, int64_t width,
                 int64_t channels);

  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);

  std::string path_;
  std::ofstream out_;
};

}  // namespace aligner
