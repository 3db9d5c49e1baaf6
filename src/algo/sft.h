// Supervised fine-tuning, with optional knowledge distillation from a frozen teacher: the loss is
// the cross-entropy of the response tokens (prompt masked), averaged per token over the global
// batch, plus kd.kd_weight x the forward KL from the teacher's top-k distribution to the
// student's, at temperature kd.temperature. The teacher is a model run beside the student
// (kd.teacher), or its top-k logits stored ahead by `aligner kd-prepare` (kd.logits).
#pragma once
#include <ATen/ATen.h>

#include "core/config.h"

namespace aligner {

// The whole `aligner sft` run described by `cfg` (configs/sft.yaml is its schema).
void run_sft(const Config& cfg);

// KL(p_teacher || p_student) summed over the rows, both at temperature T, where p_teacher is the
// softmax of the teacher's k largest logits, values [N, k] with their token ids [N, k] (lm_topk, or
// as kd-prepare stores them), and p_student is the student's full-vocabulary softmax of
// student_logits [N, vocab] read at those ids; multiplied by T^2 so that gradients keep their scale
// as T changes (Hinton et al.).
at::Tensor topk_kd_loss_sum_from_topk(const at::Tensor& student_logits, const at::Tensor& topk_values,
                                      const at::Tensor& topk_ids, double temperature);

}  // namespace aligner
