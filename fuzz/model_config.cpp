// A model's config.json of arbitrary bytes read as load_model_config reads it; an accepted config
// is also turned into a reward model's, as `aligner rm` does.
#include "core/error.h"
#include "fuzz_util.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string path = aligner::fuzz::write_scratch("config.json", data, size);
  try {
    aligner::ModelConfig config = aligner::load_model_config(path);
    aligner::sequence_classifier_config(config, {"helpfulness", "correctness"}, 0).raw.dump();
  } catch (const aligner::Error&) {
  }
  return 0;
}
