// A synthetic captioned image set for the diffusion demo: one coloured shape on a plain
// background per image, captioned with what is drawn ("a red circle on a blue background"), so that
// a model small enough to train on a CPU can learn it and a reward can be checked by eye.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace aligner {

enum class Shape : uint8_t { kCircle, kSquare, kTriangle };
enum class ShapeColour : uint8_t { kRed, kGreen, kBlue, kYellow, kPurple, kOrange, kWhite, kBlack };
inline constexpr int kNumShapes = 3;
inline constexpr int kNumShapeColours = 8;

const char* shape_name(Shape shape);
const char* colour_name(ShapeColour colour);
std::array<uint8_t, 3> colour_rgb(ShapeColour colour);

struct ShapeSpec {
  Shape shape = Shape::kCircle;
  ShapeColour colour = ShapeColour::kRed;
  ShapeColour background = ShapeColour::kBlue;  // never the shape's colour
  // As fractions of the image side: the centre (the triangle's centroid) and the radius (the
  // circle's, the square's half side, the upward triangle's circumradius). The whole shape lies
  // inside the image with a margin, so the corners are always background.
  double cx = 0.5, cy = 0.5, radius = 0.25;
};

// "a red circle on a blue background".
std::string shape_caption(const ShapeSpec& spec);
// The spec of sample `index` of the set made from `seed`: uniform shape, colour and (another)
// background colour, radius 18% to 32% of the side, centre uniform where the shape fits. The same
// on every platform (its own generator, not <random>'s distributions).
ShapeSpec shape_spec(uint64_t seed, int64_t index);
// The image, uint8 [size, size, 3]: the shape's edge anti-aliased over about a pixel, every pixel
// deeper inside exactly the shape's colour and every pixel farther out exactly the background's.
// size >= 16, else an error.
at::Tensor make_shape_image(const ShapeSpec& spec, int64_t size);

struct ShapeSample {
  ShapeSpec spec;
  at::Tensor image;  // uint8 [size, size, 3]
  std::string caption;
};
std::vector<ShapeSample> make_shape_samples(int64_t count, int64_t size, uint64_t seed);

// `dir` with images/00000.png ..., captions.jsonl ({"image": "images/00000.png", "caption": ...}
// per line) and prompts.jsonl ({"prompt": caption} per line, for sampling). Existing files of the
// same names are replaced; each file appears whole under its name. count in [1, 100000].
void write_shapes_dataset(const std::string& dir, int64_t count, int64_t size, uint64_t seed);

// The demo's differentiable reward: per image of images [N, 3, H, W] in [0, 1], the mean over its
// pixels of r - (g + b) / 2; [N] float32. 1 for pure red, -0.5 for pure green or blue.
at::Tensor redness_reward(const at::Tensor& images);

}  // namespace aligner
