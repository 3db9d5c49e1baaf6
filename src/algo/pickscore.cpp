#include "algo/pickscore.h"

#include <cmath>
#include <filesystem>

#include "algo/data_stream.h"
#include "algo/diffusion_train.h"
#include "core/error.h"
#include "core/log.h"
#include "io/hf_checkpoint.h"
#include "io/jsonl.h"
#include "text/tokenizer.h"
#include "train/run_setup.h"
#include "train/trainer.h"

namespace aligner {

namespace fs = std::filesystem;

namespace {

// data.image_fields or data.label_fields: the names of a pair's two columns.
std::vector<std::string> two_fields(const Config& cfg, const std::string& key) {
  auto names = cfg.get_string_list(key);
  if (names.size() != 2 || names[0] == names[1])
    fail("config key '{}' must name two different fields, got [{}]", key, fmt::join(names, ", "));
  return names;
}

class Pickscore final : public IndexedAlgorithm {
 public:
  Pickscore(const Config& cfg, const ClipModel& m, const Tokenizer& tok, std::vector<ImagePair> train,
            int rank, int world)
      : m_(m), tok_(tok), train_(std::move(train)), rank_(rank), world_(world) {
    micro_ = cfg.get_int("trainer.micro_batch_size");
    epochs_ = data_epochs(cfg);
    sampler_ = make_sampler(int64_t(train_.size()), rank, world, cfg.get_bool("data.shuffle"),
                            uint64_t(cfg.get_int("trainer.seed")));
    const std::string val = cfg.get_string("data.validation");
    if (!val.empty()) val_ = read_image_pairs(val, cfg);
  }

  int64_t train_examples() const override { return int64_t(train_.size()); }

  LossSums loss(int64_t i) override {
    std::vector<const ImagePair*> pairs;
    for (const auto& e : step_.at(i)) pairs.push_back(&train_[size_t(e.index)]);
    return pair_sums(pairs);
  }

  ValidationSums validate() override {
    ValidationSums v;
    v.metric_names = {"accuracy"};
    for (size_t first = size_t(rank_); first < val_.size(); first += size_t(world_ * micro_)) {
      std::vector<const ImagePair*> pairs;
      for (size_t k = first; k < val_.size() && pairs.size() < size_t(micro_); k += size_t(world_))
        pairs.push_back(&val_[k]);
      v.parts.push_back(pair_sums(pairs));
    }
    return v;
  }

 private:
  // The loss summed over `pairs`, and how often the preferred image scores higher (ties, which have
  // no preferred image, are not counted).
  LossSums pair_sums(const std::vector<const ImagePair*>& pairs) const {
    const int64_t n = int64_t(pairs.size()), size = m_.vision.cfg.image_size;
    const auto& w = m_.text.token_embedding;
    std::vector<at::Tensor> pixels[2];
    std::vector<std::string> captions;
    std::vector<double> labels;
    for (const ImagePair* p : pairs) {
      captions.push_back(p->caption);
      labels.insert(labels.end(), {p->labels[0], p->labels[1]});
      // Images of any size: each resized and cropped on its own, as CLIP's processor does.
      for (int k = 0; k < 2; ++k) {
        const auto rgb = read_rgb_png(p->images[k], p->where).to(w.device(), at::kFloat).div(255);
        pixels[k].push_back(clip_preprocess(rgb.unsqueeze(0), size)[0]);
      }
    }
    const auto x = at::stack({at::stack(pixels[0]), at::stack(pixels[1])}).to(w.scalar_type());
    const auto ids = clip_input_ids(tok_, captions, m_.text.cfg.max_position_embeddings).to(w.device());
    const auto y = at::tensor(labels, at::TensorOptions().dtype(at::kFloat)).view({n, 2}).to(w.device());
    const auto s = pickscore_loss(m_, x, ids, y);
    const auto scores = s.scores.detach().to(at::kCPU, at::kDouble);
    double right = 0, decided = 0;
    for (int64_t k = 0; k < n; ++k) {
      const double* label = pairs[size_t(k)]->labels;
      if (label[0] == label[1]) continue;
      decided += 1;
      const double s0 = scores[0][k].item<double>(), s1 = scores[1][k].item<double>();
      right += s0 == s1 ? 0.5 : (s0 > s1) == (label[0] > label[1]);  // equal scores pick neither
    }
    LossSums out;
    out.loss = s.loss.sum();
    out.units = double(n);
    out.metrics = {{"accuracy", right, decided}};
    return out;
  }

  const ClipModel& m_;
  const Tokenizer& tok_;
  std::vector<ImagePair> train_, val_;
  int rank_ = 0, world_ = 1;
};

}  // namespace

std::vector<ImagePair> read_image_pairs(const std::string& path, const Config& cfg) {
  const std::string caption_field = cfg.get_string("data.caption_field");
  const auto image_fields = two_fields(cfg, "data.image_fields");
  const auto label_fields = two_fields(cfg, "data.label_fields");
  JsonlFile f(path);
  const fs::path folder = fs::path(path).parent_path();
  std::vector<ImagePair> out;
  for (int64_t i = 0; i < f.size(); ++i) {
    const auto where = f.where(i);
    const auto line = f.read(i);
    ImagePair p;
    p.where = where;
    p.caption = get_field<std::string>(line, caption_field, where);
    for (int k = 0; k < 2; ++k) {
      p.images[k] = png_field(line, image_fields[size_t(k)], folder.string(), where);
      p.labels[k] = get_field<double>(line, label_fields[size_t(k)], where);
      if (!(p.labels[k] >= 0 && p.labels[k] <= 1))
        fail("{}: field \"{}\" must be in [0, 1], got {}", where, label_fields[size_t(k)], p.labels[k]);
    }
    if (std::abs(p.labels[0] + p.labels[1] - 1) > 1e-6)
      fail(
          "{}: fields \"{}\" and \"{}\" must sum to 1 (1 and 0 for a preference, 0.5 each for a tie), got {} "
          "and {}",
          where, label_fields[0], label_fields[1], p.labels[0], p.labels[1]);
    out.push_back(std::move(p));
  }
  return out;
}

PairScores pickscore_loss(const ClipModel& m, const at::Tensor& pixels, const at::Tensor& input_ids,
                          const at::Tensor& labels) {
  if (!m.cfg.has_vision)
    fail("PickScore needs a CLIPModel (text and vision towers), not a text encoder alone");
  const int64_t n = input_ids.size(0);
  if (pixels.dim() != 5 || pixels.size(0) != 2 || pixels.size(1) != n)
    fail("pickscore_loss takes pixels [2, {}, 3, S, S], got [{}]", n, fmt::join(pixels.sizes(), ", "));
  const auto images = clip_image_embeds(m.vision, clip_vision_forward(m.vision, pixels.flatten(0, 1)));
  const auto text = clip_text_embeds(m.text, clip_text_forward(m.text, input_ids));
  PairScores s;
  // In float32: at PickScore's scale (about 20) a bfloat16 score moves in steps of 0.125, as large as
  // the differences between the two images of a pair.
  s.scores =
      clip_embedding_scores(m, images.to(at::kFloat).view({2, n, -1}), text.to(at::kFloat).unsqueeze(0));
  s.loss = -(labels * at::log_softmax(s.scores.t(), 1)).sum(1);
  return s;
}

void run_pickscore(const Config& cfg) {
  const auto opt = read_trainer_options(cfg);
  const auto optim = read_optimizer_settings(cfg, "optim", "trainer.grad_clip");
  const std::string model_dir = cfg.get_string("model.path"), train_path = cfg.get_string("data.train");
  if (model_dir.empty()) fail("config key 'model.path' must be set: a transformers CLIPModel folder");
  if (train_path.empty()) fail("config key 'data.train' must be set");
  auto train_data = read_image_pairs(train_path, cfg);
  log_info("data.train {}: {} image pairs", train_path, train_data.size());
  auto ctx = init_run(cfg);
  const auto dtype = parse_compute_dtype(cfg.get_string("model.dtype"), ctx.device, "model.dtype");
  ClipModel m = load_clip_model(model_dir, ctx.device, dtype);
  if (!m.cfg.has_vision)
    fail("model.path {}: a CLIPModel (text and vision towers) is needed, not a text encoder alone",
         model_dir);
  const auto tok = load_tokenizer(model_dir);
  check_tokenizer_fits(*tok, m.text.cfg.vocab_size, model_dir);

  TrainableModule module;
  module.name = "clip";
  module.optim = optim;
  module.other.parameters = [&m] { return named_parameters(m); };
  module.other.save = [&m, model_dir](const std::string& dir) {
    save_clip_model(m, (fs::path(model_dir) / "config.json").string(), model_dir, dir, Replace::anything);
  };
  module.params = module.other.parameters();
  Pickscore algo(cfg, m, *tok, std::move(train_data), ctx.dist.rank(), ctx.dist.world_size());
  train(cfg, opt, {module}, algo, ctx.dist);
}

}  // namespace aligner
