// Supervised fine-tuning, with optional knowledge distillation from a frozen teacher: the loss is
// the cross-entropy of the response tokens (prompt masked), averaged per token over the global
// batch, plus kd.kd_weight x the forward KL from the teacher's top-k distribution to the
// student's, at temperature kd.temperature.
#pragma once
#include "core/config.h"

namespace aligner {

// The whole `aligner sft` run described by `cfg` (configs/sft.yaml is its schema).
void run_sft(const Config& cfg);

// KL(p_teacher || p_student) summed over the rows, both at temperature T, where p_teacher is the
// softmax of the teacher's k largest logits and p_student is the student's full-vocabulary softmax
// read at those k ids; multiplied by T^2 so that gradients keep their scale as T changes (Hinton
// et al.). Logits are [N, vocab].
at::Tensor topk_kd_loss_sum(const at::Tensor& student_logits, const at::Tensor& teacher_logits, int64_t k,
                            double temperature);

}  // namespace aligner
