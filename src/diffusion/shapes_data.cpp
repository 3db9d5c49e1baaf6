#include "diffusion/shapes_data.h"

#include <fmt/format.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "gen/sequence_stream.h"
#include "io/hf_checkpoint.h"
#include "io/png.h"

namespace aligner {

namespace {

uint64_t splitmix64(uint64_t& state) {
  return mix64(state += 0x9E3779B97F4A7C15ull);
}

double uniform01(uint64_t& state) {
  return double(splitmix64(state) >> 11) * 0x1.0p-53;
}

}  // namespace

const char* shape_name(Shape shape) {
  static const char* const kNames[] = {"circle", "square", "triangle"};
  return kNames[int(shape)];
}

const char* colour_name(ShapeColour colour) {
  static const char* const kNames[] = {"red",    "green",  "blue",  "yellow",
                                       "purple", "orange", "white", "black"};
  return kNames[int(colour)];
}

std::array<uint8_t, 3> colour_rgb(ShapeColour colour) {
  static const std::array<uint8_t, 3> kRgb[] = {{220, 30, 30},   {40, 170, 60},  {40, 70, 220},
                                                {240, 210, 40},  {140, 50, 180}, {245, 140, 30},
                                                {245, 245, 245}, {20, 20, 20}};
  return kRgb[int(colour)];
}

std::string shape_caption(const ShapeSpec& spec) {
  return fmt::format("a {} {} on a {} background", colour_name(spec.colour), shape_name(spec.shape),
                     colour_name(spec.background));
}

ShapeSpec shape_spec(uint64_t seed, int64_t index) {
  uint64_t state = seed;
  splitmix64(state);
  state ^= uint64_t(index) * 0xD1B54A32D192ED03ull;
  ShapeSpec s;
  s.shape = Shape(splitmix64(state) % kNumShapes);
  s.colour = ShapeColour(splitmix64(state) % kNumShapeColours);
  // One of the other seven colours.
  s.background =
      ShapeColour((int(s.colour) + 1 + splitmix64(state) % (kNumShapeColours - 1)) % kNumShapeColours);
  s.radius = 0.18 + 0.14 * uniform01(state);
  const double margin = 0.06, lo = s.radius + margin, span = 1 - 2 * lo;
  s.cx = lo + span * uniform01(state);
  s.cy = lo + span * uniform01(state);
  return s;
}

at::Tensor make_shape_image(const ShapeSpec& spec, int64_t size) {
  if (size < 16) fail("shapes: image size {} is below 16 pixels", size);
  const double n = double(size), cx = spec.cx * n, cy = spec.cy * n, r = spec.radius * n;
  // Signed distances (in pixels, negative inside) from the pixel centres to the shape's outline:
  // exact for the circle, and for the square and triangle inside and along their edges, which is
  // all the anti-aliasing ramp looks at.
  const auto coords = at::arange(size, at::kDouble) + 0.5;
  const auto dx = (coords - cx).view({1, size}), dy = (coords - cy).view({size, 1});
  at::Tensor d;
  switch (spec.shape) {
    case Shape::kCircle:
      d = (dx * dx + dy * dy).sqrt() - r;
      break;
    case Shape::kSquare:
      d = at::maximum(dx.abs(), dy.abs()) - r;
      break;
    case Shape::kTriangle: {
      // Pointing up (y grows downwards): the bottom edge and the two slanted ones, each r / 2 from
      // the centroid along its outward normal.
      const double c = std::sqrt(3.0) / 2;
      d = at::maximum(at::maximum(dy.expand({size, size}), c * dx - 0.5 * dy), -c * dx - 0.5 * dy) - r / 2;
      break;
    }
  }
  const auto alpha = (0.5 - d).clamp(0, 1).unsqueeze(-1);  // [size, size, 1] coverage
  const auto fg_rgb = colour_rgb(spec.colour), bg_rgb = colour_rgb(spec.background);
  const auto fg = at::tensor({double(fg_rgb[0]), double(fg_rgb[1]), double(fg_rgb[2])}, at::kDouble);
  const auto bg = at::tensor({double(bg_rgb[0]), double(bg_rgb[1]), double(bg_rgb[2])}, at::kDouble);
  return (bg + alpha * (fg - bg)).round().to(at::kByte).contiguous();
}

std::vector<ShapeSample> make_shape_samples(int64_t count, int64_t size, uint64_t seed) {
  std::vector<ShapeSample> samples;
  samples.reserve(size_t(std::max<int64_t>(count, 0)));
  for (int64_t i = 0; i < count; ++i) {
    auto spec = shape_spec(seed, i);
    samples.push_back({spec, make_shape_image(spec, size), shape_caption(spec)});
  }
  return samples;
}

void write_shapes_dataset(const std::string& dir, int64_t count, int64_t size, uint64_t seed) {
  if (count < 1 || count > 100000) fail("shapes: {} images is not in [1, 100000]", count);
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(fs::path(dir) / "images", ec);
  if (ec) fail("{}: cannot create the folder: {}", dir, ec.message());
  std::string captions, prompts;
  for (int64_t i = 0; i < count; ++i) {
    const auto spec = shape_spec(seed, i);
    const std::string name = fmt::format("images/{:05d}.png", i), caption = shape_caption(spec);
    write_png((fs::path(dir) / name).string(), make_shape_image(spec, size));
    captions += nlohmann::ordered_json{{"image", name}, {"caption", caption}}.dump() + "\n";
    prompts += nlohmann::json{{"prompt", caption}}.dump() + "\n";
  }
  write_text_atomically((fs::path(dir) / "captions.jsonl").string(), captions);
  write_text_atomically((fs::path(dir) / "prompts.jsonl").string(), prompts);
}

at::Tensor redness_reward(const at::Tensor& images) {
  if (images.dim() != 4 || images.size(1) != 3)
    fail("redness_reward: images must be [N, 3, H, W], got [{}]", fmt::join(images.sizes(), ", "));
  const auto x = images.to(at::kFloat);
  return (x.select(1, 0) - (x.select(1, 1) + x.select(1, 2)) / 2).mean({1, 2});
}

}  // namespace aligner
