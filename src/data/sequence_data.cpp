#include "data/sequence_data.h"

#include "data/common.h"

namespace aligner {

std::vector<std::vector<int32_t>> read_token_sequences(const std::string& path, int64_t vocab,
                                                       const EncodeRecord& encode) {
  JsonlFile file(path);
  std::vector<std::vector<int32_t>> out;
  out.reserve(size_t(file.size()));
  for (int64_t i = 0; i < file.size(); ++i) {
    const auto where = file.where(i);
    const auto record = file.read(i);
    std::vector<int32_t> ids;
    if (record.contains("input_ids")) {
      ids = parse_token_ids(record["input_ids"], where, "input_ids", vocab);
    } else {
      ids = encode(record, where);
      for (int32_t id : ids)
        if (id < 0 || id >= vocab)
          fail("{}: the tokenizer gives token id {}, outside the model's vocabulary [0, {})", where, id,
               vocab);
    }
    if (ids.empty()) fail("{}: empty sequence", where);
    out.push_back(std::move(ids));
  }
  return out;
}

}  // namespace aligner
