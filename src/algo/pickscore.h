// PickScore training (configs/pickscore.yaml is the schema): a CLIPModel learns from pairs of images
// of one caption which of the two people prefer, as Kirstain et al.'s PickScore and NeMo-Aligner's
// CLIP reward model for DRaFT+ are trained. The result is the reward `aligner draftp` scores with.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "core/config.h"
#include "diffusion/clip.h"

namespace aligner {

// The whole `aligner pickscore` run described by `cfg`.
void run_pickscore(const Config& cfg);

// One line of the pairs file: a caption, two images (paths) and the preference as probabilities
// (1 and 0, or 0.5 each for a tie), Pick-a-Pic's columns.
struct ImagePair {
  std::string caption;
  std::string images[2];
  double labels[2] = {0, 0};
  std::string where;  // "file:line", for errors found when the images are read
};

// Every line of the JSONL `path`, the fields named by data.caption_field, data.image_fields and
// data.label_fields, image paths relative to the file's folder. A missing or mistyped field, an image
// file that does not exist, or labels outside [0, 1] or not summing to 1 is an error naming the file,
// line and field.
std::vector<ImagePair> read_image_pairs(const std::string& path, const Config& cfg);

// PickScore's loss terms for n pairs: each image's score exp(logit_scale) x cos(image, caption)
// (pixels [2, n, 3, S, S] from clip_preprocess, the first and second images of each pair; input_ids
// [n, T]), and per pair the cross entropy of softmax(score_0, score_1) against the labels [n, 2].
struct PairScores {
  at::Tensor scores;  // [2, n]
  at::Tensor loss;    // [n], float32
};
PairScores pickscore_loss(const ClipModel& m, const at::Tensor& pixels, const at::Tensor& input_ids,
                          const at::Tensor& labels);

}  // namespace aligner
