#include "algo/data_stream.h"

namespace aligner {

DataOptions read_data_options(const Config& cfg) {
  DataOptions opt;
  opt.format = cfg.get_string("data.format");
  opt.max_length = cfg.get_int("data.max_length");
  opt.truncation = parse_truncation(cfg.get_string("data.truncation"));
  opt.skip_bad_lines = cfg.get_bool("data.skip_bad_lines");
  opt.add_eos = cfg.get_bool("data.add_eos");
  return opt;
}

}  // namespace aligner
