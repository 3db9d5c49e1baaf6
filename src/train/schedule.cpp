#include "train/schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace aligner {

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "constant") return ScheduleKind::kConstant;
  if (name == "linear") return ScheduleKind::kLinear;
  if (name == "cosine") return ScheduleKind::kCosine;
  fail("unknown learning-rate schedule '{}' (valid: constant, linear, cosine)", name);
}

const char* schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kConstant:
      return "constant";
    case ScheduleKind::kLinear:
      return "linear";
    case ScheduleKind::kCosine:
      return "cosine";
  }
  return "?";  // unreachable; keeps -Wreturn-type quiet
}

void check_schedule(const Schedule& s) {
  const char* name = schedule_kind_name(s.kind);
  if (!(s.lr >= 0.0)) fail("{} schedule: lr must be >= 0, got {}", name, s.lr);
  if (s.warmup_steps < 0) fail("{} schedule: warmup_steps must be >= 0, got {}", name, s.warmup_steps);
  if (s.kind == ScheduleKind::kConstant) return;
  if (!(s.min_lr >= 0.0 && s.min_lr <= s.lr))
    fail("{} schedule: min_lr must be in [0, lr = {}], got {}", name, s.lr, s.min_lr);
  if (s.max_steps < s.warmup_steps)
    fail("{} schedule: max_steps ({}) must be >= warmup_steps ({})", name, s.max_steps, s.warmup_steps);
}

double schedule_lr(const Schedule& s, int64_t step) {
  check_schedule(s);
  if (step < 0) fail("{} schedule: step must be >= 0, got {}", schedule_kind_name(s.kind), step);
  if (step < s.warmup_steps) return s.lr * double(step) / double(s.warmup_steps);
  if (s.kind == ScheduleKind::kConstant) return s.lr;
  const double progress = std::min(
      1.0, double(step - s.warmup_steps) / double(std::max<int64_t>(1, s.max_steps - s.warmup_steps)));
  const double factor =
      s.kind == ScheduleKind::kLinear ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return s.min_lr + (s.lr - s.min_lr) * factor;
}

}  // namespace aligner
