// Learning-rate schedules with the semantics of transformers' get_*_schedule_with_warmup: the rate
// for 0-based optimizer step s rises linearly as lr * s / warmup_steps (so the first step runs at
// 0), then stays at lr (constant) or decays to min_lr at max_steps (linear, cosine) and stays there.
#pragma once
#include <cstdint>
#include <string>

namespace aligner {

enum class ScheduleKind { kConstant, kLinear, kCosine };

// "constant", "linear" or "cosine"; anything else is an aligner::Error listing those.
ScheduleKind parse_schedule_kind(const std::string& name);
const char* schedule_kind_name(ScheduleKind kind);

struct Schedule {
  ScheduleKind kind = ScheduleKind::kConstant;
  double lr = 0.0;      // peak, reached at the end of warmup
  double min_lr = 0.0;  // where linear and cosine end; unused by constant
  int64_t warmup_steps = 0;
  int64_t max_steps = 0;  // where linear and cosine reach min_lr; unused by constant
};

// aligner::Error for lr < 0, min_lr outside [0, lr], warmup_steps < 0, or a decaying schedule
// whose max_steps is below warmup_steps. Lets a command reject its config before training starts.
void check_schedule(const Schedule& s);

// The learning rate for 0-based optimizer step `step` (checks `s` first):
//   step < warmup_steps:  lr * step / warmup_steps
//   then, with progress = (step - warmup_steps) / max(1, max_steps - warmup_steps) capped at 1,
//   constant: lr;  linear: min_lr + (lr - min_lr) * (1 - progress);
//   cosine: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress)).
double schedule_lr(const Schedule& s, int64_t step);

}  // namespace aligner
