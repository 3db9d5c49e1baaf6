// The layer kernels of training (model/fused_layers.cpp: the residual add with RMSNorm, SwiGLU,
// rotary embeddings, the head's target log-probabilities) against their ATen reference, values and gradients,
// and a whole model's forward and backward on the GPU (which takes them) against the CPU (which does not),
// and the attention kernel compat::sdpa picks for repeated shapes. GPU only.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/function.h>

#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/torch_compat.h"
#include "io/hf_checkpoint.h"
#include "model/layers.h"
#include "model/transformer.h"

using namespace aligner;

namespace {

const std::string kFixtures = std::string(ALIGNER_SOURCE_DIR) + "/tests/fixtures/models/";

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble).cpu() - b.to(at::kDouble).cpu()).abs().max().item<double>();
}

at::Tensor leaf(const at::Tensor& t) {
  return t.detach().clone().requires_grad_(true);
}

// The inputs of one op, and what a check of it compares: its outputs and the inputs' gradients for
// a fixed random weighting of the outputs.
using Op = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

std::vector<at::Tensor> outputs_and_grads(const Op& op, const std::vector<at::Tensor>& inputs,
                                          at::ScalarType dtype, uint64_t seed) {
  std::vector<at::Tensor> in;
  for (const auto& t : inputs) in.push_back(leaf(t.to(dtype)));
  const auto outs = op(in);
  at::Tensor loss = at::zeros({}, outs[0].options().dtype(at::kDouble));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<at::Tensor> result;
  for (const auto& o : outs) {
    loss = loss + (o.to(at::kDouble) * at::randn(o.sizes(), gen, at::kDouble).to(o.device())).sum();
    result.push_back(o.detach());
  }
  loss.backward();
  // An input the weighted outputs do not depend on has no gradient: zeros, on either path.
  for (const auto& t : in) result.push_back(t.grad().defined() ? t.grad() : at::zeros_like(t));
  return result;
}

// The op on the GPU in `dtype` (the kernels) against the same op in float64 (ATen, which the
// kernels do not take): within `tolerance` relative to each tensor's largest value in float32;
// in 16-bit types no further from float64 than the ATen path in that type (`aten`) is, plus a
// rounding step, for every output and gradient.
void expect_kernels_match(const Op& op, const Op& aten, const std::vector<at::Tensor>& inputs,
                          const std::string& what) {
  const auto exact = outputs_and_grads(aten, inputs, at::kDouble, 1);
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    const auto fused = outputs_and_grads(op, inputs, dtype, 1);
    const auto reference = outputs_and_grads(aten, inputs, dtype, 1);
    ASSERT_EQ(fused.size(), exact.size());
    for (size_t i = 0; i < exact.size(); ++i) {
      const double scale = exact[i].abs().max().item<double>() + 1e-12;
      const double err = max_diff(fused[i], exact[i]) / scale,
                   aten_err = max_diff(reference[i], exact[i]) / scale;
      const std::string where = what + ", " + c10::toString(dtype) + ", tensor " + std::to_string(i);
      if (dtype == at::kFloat)
        EXPECT_LT(err, 2e-5) << where;
      else
        EXPECT_LE(err, 1.5 * aten_err + 8e-3) << where << ": kernels " << err << ", ATen " << aten_err;
    }
  }
}

ModelConfig llama_config(int64_t head_dim, int64_t rotary_dim) {
  ModelConfig c;
  c.head_dim = head_dim;
  c.rotary_dim = rotary_dim;
  c.rms_norm_eps = 1e-5;
  return c;
}

TEST(FusedLayers, AddRmsNormEqualsAten) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  const auto c = llama_config(64, 64);
  // In the forward pass 16-bit rows of up to 2048 take a warp each: one partial pack a lane, two
  // packs, a partial last pack of four, and full rows of 2048 (more of them than the backward pass
  // has blocks, so that its blocks take several). Longer rows take a block each: two packs a
  // thread, and the most the kernels keep (8192).
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{
           {7, 24}, {9, 400}, {5, 776}, {1500, 2048}, {300, 2048 + 256}, {33, 8192}}) {
    const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kDouble);
    const std::vector<at::Tensor> inputs = {at::randn({3, rows, cols}, opts),
                                            at::randn({3, rows, cols}, opts),
                                            1 + 0.1 * at::randn({cols}, opts)};
    const auto fused = [&](const std::vector<at::Tensor>& t) {
      const auto [sum, normed] = add_norm(c, t[0], t[1], t[2], {});
      return std::vector<at::Tensor>{sum, normed};
    };
    const auto aten = [&](const std::vector<at::Tensor>& t) {
      const auto sum = t[0] + t[1];
      return std::vector<at::Tensor>{sum, compat::rms_norm(sum, t[2], c.rms_norm_eps)};
    };
    expect_kernels_match(fused, aten, inputs, std::to_string(rows) + " x " + std::to_string(cols));
    // Without a residual to add: x passed through, its gradient summed with the norm's.
    const auto alone = [&](bool kernels) {
      return [&, kernels](const std::vector<at::Tensor>& t) {
        if (!kernels) return std::vector<at::Tensor>{t[0], compat::rms_norm(t[0], t[2], c.rms_norm_eps)};
        const auto [x, normed] = add_norm(c, t[0], {}, t[2], {});
        return std::vector<at::Tensor>{x, normed};
      };
    };
    expect_kernels_match(alone(true), alone(false), inputs, "no residual");
    // Only the normed output, or only the sum, carrying a gradient.
    for (int keep = 0; keep < 2; ++keep) {
      const auto one = [&, keep](const Op& f) {
        return [f, keep](const std::vector<at::Tensor>& t) { return std::vector<at::Tensor>{f(t)[keep]}; };
      };
      expect_kernels_match(one(fused), one(aten), inputs, "output " + std::to_string(keep) + " alone");
    }
  }
}

TEST(FusedLayers, SwigluEqualsAten) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kDouble);
  const auto aten = [](const std::vector<at::Tensor>& t) {
    return std::vector<at::Tensor>{at::silu(t[0]) * t[1]};
  };
  // Two projections' outputs (packs of 8), and an odd width (one element a thread).
  for (int64_t cols : {5632, 13}) {
    const std::vector<at::Tensor> inputs = {3 * at::randn({2, 50, cols}, opts),
                                            at::randn({2, 50, cols}, opts)};
    const auto fused = [](const std::vector<at::Tensor>& t) {
      return std::vector<at::Tensor>{swiglu(t[0], t[1])};
    };
    expect_kernels_match(fused, aten, inputs, "width " + std::to_string(cols));
  }
  // The two halves of one joined projection's output (rows at twice their width).
  const std::vector<at::Tensor> joined = {at::randn({40, 2 * 256}, opts)};
  const auto halves = [](bool fused) {
    return [fused](const std::vector<at::Tensor>& t) {
      const auto gate = t[0].narrow(1, 0, 256), up = t[0].narrow(1, 256, 256);
      return std::vector<at::Tensor>{fused ? swiglu(gate, up) : at::silu(gate) * up};
    };
  };
  expect_kernels_match(halves(true), halves(false), joined, "halves of a joined projection");
}

// The log-probability of each row's target (0 for rows not scored) and its gradient, against ATen in
// float64 on the same (rounded) logits: a vocabulary in packs of eight and an odd one.
TEST(FusedLayers, TargetLogprobsEqualAten) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  const auto opts = at::TensorOptions().device(at::kCUDA);
  const int64_t rows = 37;
  for (int64_t vocab : {32000, 1001}) {
    const auto logits = 4 * at::randn({rows, vocab}, opts.dtype(at::kDouble));
    auto targets = at::randint(vocab, {rows}, opts.dtype(at::kLong));
    targets.index_fill_(0, at::arange(0, rows, 5, opts.dtype(at::kLong)), -100);
    const auto weights = at::randn({rows}, opts.dtype(at::kDouble));
    const auto run = [&](const at::Tensor& input) {
      auto x = leaf(input);
      const auto out = target_logprobs(x, targets);
      (out.to(at::kDouble) * weights).sum().backward();
      return std::make_pair(out.detach(), x.grad());
    };
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      const std::string where = "vocabulary " + std::to_string(vocab) + ", " + c10::toString(dtype);
      const auto [exact, exact_grad] = run(logits.to(dtype).to(at::kDouble));
      const auto [out, grad] = run(logits.to(dtype));
      EXPECT_EQ(out.scalar_type(), at::kFloat) << where;
      EXPECT_EQ(grad.scalar_type(), dtype) << where;
      EXPECT_LT(max_diff(out, exact), 1e-4) << where;
      EXPECT_EQ(out.index({targets < 0}).abs().sum().item<double>(), 0.0) << where;
      const double scale = exact_grad.abs().max().item<double>();
      EXPECT_LT(max_diff(grad, exact_grad), (dtype == at::kFloat ? 1e-5 : 8e-3) * scale) << where;
    }
  }
}

TEST(FusedLayers, RotaryEmbeddingEqualsAten) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kDouble);
  const int64_t B = 3, T = 37, H = 4;
  // Whole heads rotating (eight pairs a thread, or one where 16 does not divide the head); half of
  // each (Nemotron's partial rotary); positions per row or shared.
  struct Case {
    int64_t head_dim, rotary_dim;
    bool shared;
  };
  for (const Case& k : {Case{64, 64, false}, Case{128, 128, true}, Case{16, 8, false}, Case{24, 24, true}}) {
    const int64_t D = k.head_dim, R = k.rotary_dim;
    const bool shared = k.shared;
    auto c = llama_config(D, R);
    c.rope.theta = 10000;
    const auto positions = shared ? at::arange(T, opts.dtype(at::kLong)).unsqueeze(0)
                                  : at::randint(0, 4000, {B, T}, opts.dtype(at::kLong));
    // The projection's output [B, T, H x D] (contiguous), and heads in a strided layout.
    for (bool strided : {false, true}) {
      const std::vector<at::Tensor> inputs = {at::randn({B, T, H * D}, opts)};
      const auto run = [&, strided](bool fused) {
        return [&, strided, fused](const std::vector<at::Tensor>& t) {
          const auto [cos, sin] = rope_cos_sin(c, positions, t[0].scalar_type());
          auto x = t[0].view({B, T, H, D});
          if (strided) x = x.transpose(0, 1).contiguous().transpose(0, 1);
          auto out = fused ? rotate_heads(x, cos, sin) : apply_rope(x.transpose(1, 2), cos, sin);
          if (fused && t[0].scalar_type() != at::kDouble) {
            EXPECT_TRUE(out.transpose(1, 2).is_contiguous());
          }
          return std::vector<at::Tensor>{out};
        };
      };
      expect_kernels_match(
          run(true), run(false), inputs,
          "head_dim " + std::to_string(D) + ", rotary " + std::to_string(R) + (strided ? ", strided" : ""));
    }
  }
}

// A model's loss and every gradient on the GPU (kernels, float32) equal the CPU's (ATen), for the
// families whose layers differ: grouped heads, per-head norms, partial rotary with LayerNorm1P,
// with and without recomputed layers.
TEST(FusedLayers, ModelGradientsOnTheGpuEqualTheCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  for (const std::string name : {"llama3", "qwen3", "nemotron", "mistral"}) {
    for (int64_t checkpointed : {int64_t(0), kAllLayers}) {
      std::map<std::string, at::Tensor> grads[2];
      double losses[2];
      for (int d = 0; d < 2; ++d) {
        const at::Device device = d ? at::Device(at::kCUDA) : at::Device(at::kCPU);
        auto m = load_transformer(kFixtures + name, device, at::kFloat);
        for (auto& [n, p] : named_parameters(m)) p.requires_grad_(true);
        auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
        ForwardInput in;
        in.input_ids = at::randint(0, m.cfg.vocab_size, {2, 24}, gen, at::kLong).to(device);
        in.checkpointed_layers = checkpointed;
        const auto targets = in.input_ids.roll(-1, 1);
        const auto loss = -token_logprobs(m, forward_hidden(m, in), targets).mean();
        loss.backward();
        losses[d] = loss.item<double>();
        for (auto& [n, p] : named_parameters(m))
          if (p.grad().defined()) grads[d][n] = p.grad().cpu();
      }
      const std::string where = name + (checkpointed ? ", recomputed" : "");
      EXPECT_NEAR(losses[1], losses[0], 1e-5) << where;
      ASSERT_EQ(grads[1].size(), grads[0].size()) << where;
      for (const auto& [n, g] : grads[0]) {
        const double scale = g.abs().max().item<double>() + 1e-8;
        EXPECT_LT(max_diff(grads[1].at(n), g) / scale, 1e-4) << where << ": " << n;
      }
    }
  }
}

// compat::sdpa sends causal, unmasked calls of one shape to cuDNN's attention once the time flash
// attention has lost on that shape in training would have paid for cuDNN's plan, from the next
// training step on: the first calls take another kernel, later ones cuDNN's, and both give the same
// outputs and gradients within bf16 rounding.
TEST(FusedLayers, CudnnAttentionTakesRepeatedShapesAndMatches) {
#if ALIGNER_TORCH_2_5
  if (!at::hasCUDA()) GTEST_SKIP() << "needs a GPU";
  // The 1.1B step's layer, where flash attention loses ~0.7 ms a call: ~160 calls pay the plan.
  const int64_t B = 8, H = 32, Hkv = 4, T = 2048, D = 64;
  const auto opts = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  at::manual_seed(3);
  const auto q = leaf(at::randn({B, H, T, D}, opts)), k = leaf(at::randn({B, Hkv, T, D}, opts)),
             v = leaf(at::randn({B, Hkv, T, D}, opts));
  const auto weights = at::randn({B, H, T, D}, opts);
  const double scale = 1.0 / std::sqrt(double(D));
  {
    // Torch itself prefers cuDNN's kernel only on some GPUs and cuDNN versions.
    at::globalContext().setSDPUseCuDNN(true);
    const auto out = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, true, scale, true);
    if (out.grad_fn()->name().find("Cudnn") == std::string::npos)
      GTEST_SKIP() << "torch takes " << out.grad_fn()->name() << " here even with cuDNN's allowed";
  }
  // The output, the inputs' gradients, and the name of the backward node (which kernel ran).
  const auto call = [&] {
    for (const auto* t : {&q, &k, &v}) t->mutable_grad() = at::Tensor();
    const auto out = compat::sdpa(q, k, v, std::nullopt, /*is_causal=*/true, scale);
    const std::string node = out.grad_fn()->name();
    (out * weights).sum().backward();
    return std::make_pair(std::vector<at::Tensor>{out.detach(), q.grad(), k.grad(), v.grad()}, node);
  };
  // A step of 22 layers' calls at a time, as the trainer runs them.
  const auto first = call();
  EXPECT_EQ(first.second.find("Cudnn"), std::string::npos) << first.second;
  int steps = 0;
  auto later = first;
  while (later.second.find("Cudnn") == std::string::npos && steps < 30) {
    compat::choose_attention_kernels();
    ++steps;
    std::set<std::string> kernels;
    for (int layer = 0; layer < 22; ++layer) kernels.insert((later = call()).second);
    EXPECT_EQ(kernels.size(), 1u) << "step " << steps << " mixes kernels";
  }
  ASSERT_NE(later.second.find("Cudnn"), std::string::npos) << "after " << steps << " steps: " << later.second;
  EXPECT_GE(steps, 5);
  for (size_t i = 0; i < first.first.size(); ++i) {
    const double size = first.first[i].abs().max().item<double>();
    EXPECT_LT(max_diff(later.first[i], first.first[i]) / size, 2e-2) << "tensor " << i;
  }
#else
  GTEST_SKIP() << "cuDNN's attention is chosen on torch 2.5+";
#endif
}

}  // namespace
