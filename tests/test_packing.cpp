// Packing must not change what the model computes: the same examples packed into shared rows give
// the same per-token log-probabilities, and so the same loss, as one example per padded row.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "algo/dpo.h"
#include "data/packing.h"
#include "model/transformer.h"

namespace aligner {
namespace {

ModelConfig tiny_llama() {
  ModelConfig cfg;
  cfg.model_type = "llama";
  cfg.vocab_size = 64;
  cfg.hidden_size = 32;
  cfg.intermediate_size = 64;
  cfg.num_layers = 2;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.max_position_embeddings = 128;
  cfg.window = {0, 0};
  return cfg;
}

// Token ids from a fixed hash, so the test needs no random generator.
std::vector<Sequence> make_sequences(const std::vector<int64_t>& lengths) {
  std::vector<Sequence> out;
  uint64_t x = 12345;
  for (int64_t n : lengths) {
    Sequence s;
    for (int64_t t = 0; t < n; ++t) {
      x = x * 6364136223846793005ull + 1442695040888963407ull;
      s.input_ids.push_back(static_cast<int32_t>(1 + (x >> 33) % 63));
      s.loss_mask.push_back(t >= n / 3 ? 1 : 0);  // a prompt, then a response
    }
    out.push_back(std::move(s));
  }
  return out;
}

// log p(label) at every labelled position, zero elsewhere: [B, T].
at::Tensor label_logprobs(const Transformer& m, const Batch& b) {
  ForwardInput in;
  in.input_ids = b.input_ids;
  in.attention_mask = b.attention_mask;
  in.position_ids = b.position_ids;
  in.segment_ids = b.segment_ids;
  at::Tensor valid = b.labels.ne(kIgnoreIndex);
  at::Tensor lp = token_logprobs(m, forward_hidden(m, in), b.labels.clamp_min(0));
  return lp.to(at::kDouble) * valid;
}

TEST(PackingWithModel, PackedRowsGiveThePaddedLogprobsAndLoss) {
  at::NoGradGuard no_grad;
  Transformer m = init_transformer(tiny_llama(), at::kCPU, 0);
  std::vector<Sequence> seqs = make_sequences({7, 12, 5, 9, 16, 3, 11});
  std::vector<int64_t> lengths;
  for (const auto& s : seqs) lengths.push_back(static_cast<int64_t>(s.input_ids.size()));
  std::vector<std::vector<int64_t>> rows = plan_packing(lengths, 24);
  ASSERT_LT(rows.size(), seqs.size());  // something is packed

  Batch padded = collate_padded(seqs, 0);
  Batch packed = collate_packed(seqs, rows, 0);
  at::Tensor lp_padded = label_logprobs(m, padded);
  at::Tensor lp_packed = label_logprobs(m, packed);

  // Each example's log-probabilities, position by position.
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t col = 0;
    for (int64_t i : rows[r]) {
      int64_t n = lengths[static_cast<size_t>(i)];
      at::Tensor a = lp_padded[i].slice(0, 0, n);
      at::Tensor b = lp_packed[static_cast<int64_t>(r)].slice(0, col, col + n);
      EXPECT_TRUE(at::allclose(a, b, 1e-5, 1e-5)) << "example " << i << "\n" << a << "\n" << b;
      col += n;
    }
  }
  int64_t tokens_padded = padded.labels.ne(kIgnoreIndex).sum().item<int64_t>();
  int64_t tokens_packed = packed.labels.ne(kIgnoreIndex).sum().item<int64_t>();
  ASSERT_EQ(tokens_padded, tokens_packed);
  double loss_padded = -lp_padded.sum().item<double>() / static_cast<double>(tokens_padded);
  double loss_packed = -lp_packed.sum().item<double>() / static_cast<double>(tokens_packed);
  EXPECT_NEAR(loss_padded, loss_packed, 1e-5);
  EXPECT_GT(loss_padded, 0.0);
}

// The same holds for training: the loss's gradients are the padded rows'. With ALIGNER_TEST_DEVICE=cuda
// this runs in bfloat16 on the GPU, where packed rows take varlen flash attention and padded ones a
// masked kernel: two different attention paths that must agree.
TEST(PackingWithModel, PackedRowsGiveThePaddedGradients) {
  const char* d = std::getenv("ALIGNER_TEST_DEVICE");
  const bool cuda = d && std::string(d) == "cuda";
  const at::Device device = cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  const auto dtype = cuda ? at::kBFloat16 : at::kFloat;
  ModelConfig cfg = tiny_llama();
  cfg.hidden_size = 128;  // head_dim 32: a size flash attention takes
  cfg.head_dim = 32;
  Transformer m = init_transformer(cfg, device, 0);
  for (auto& [name, p] : named_parameters(m)) p.set_data(p.to(dtype)), p.requires_grad_(true);
  std::vector<Sequence> seqs = make_sequences({7, 12, 5, 9, 16, 3, 11});
  std::vector<int64_t> lengths;
  for (const auto& s : seqs) lengths.push_back(static_cast<int64_t>(s.input_ids.size()));
  const auto rows = plan_packing(lengths, 24);
  ASSERT_LT(rows.size(), seqs.size());

  const auto grads = [&](Batch b) {
    // Segment ids stay in host memory, as the commands pass them.
    for (at::Tensor* t : {&b.input_ids, &b.attention_mask, &b.position_ids, &b.labels})
      if (t->defined()) *t = t->to(device);
    for (auto& [name, p] : named_parameters(m)) p.mutable_grad() = at::Tensor();
    label_logprobs(m, b).sum().backward();
    std::vector<at::Tensor> g;
    for (auto& [name, p] : named_parameters(m)) g.push_back(p.grad().to(at::kCPU, at::kDouble));
    return g;
  };
  const auto padded = grads(collate_padded(seqs, 0));
  const auto packed = grads(collate_packed(seqs, rows, 0));
  ASSERT_EQ(padded.size(), packed.size());
  const double tol = cuda ? 2e-2 : 1e-5;  // relative to the gradient's size
  for (size_t i = 0; i < padded.size(); ++i) {
    const double scale = padded[i].abs().max().item<double>();
    ASSERT_GT(scale, 0) << i;
    EXPECT_LE((padded[i] - packed[i]).abs().max().item<double>(), tol * scale)
        << named_parameters(m)[i].first;
  }
}

// DPO's packed batches: the chosen and rejected sequences of several pairs share rows, and each
// sequence's summed response log-probability, its token count and their gradients are the padded
// batch's. With ALIGNER_TEST_DEVICE=cuda in bfloat16 through varlen flash attention.
TEST(PackingWithModel, PackedPreferencePairsGiveThePaddedResponseLogprobs) {
  const char* d = std::getenv("ALIGNER_TEST_DEVICE");
  const bool cuda = d && std::string(d) == "cuda";
  const at::Device device = cuda ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  const auto dtype = cuda ? at::kBFloat16 : at::kFloat;
  ModelConfig cfg = tiny_llama();
  cfg.hidden_size = 128;
  cfg.head_dim = 32;
  Transformer m = init_transformer(cfg, device, 0);
  for (auto& [name, p] : named_parameters(m)) p.set_data(p.to(dtype)), p.requires_grad_(true);
  const auto seqs = make_sequences({9, 14, 6, 11, 20, 5, 8, 13});
  std::vector<PreferenceExample> pairs;
  for (size_t k = 0; k < seqs.size(); k += 2) pairs.push_back({seqs[k], seqs[k + 1], 2, {}, {}, {}});
  const auto padded = collate_preferences(pairs, 0), packed = collate_preferences(pairs, 0, 32);
  ASSERT_LT(packed.seqs.input_ids.size(0), padded.seqs.input_ids.size(0));
  EXPECT_EQ(packed.seqs.source_index.max().item<int64_t>(), 7);
  // Weights per sequence, so that a sum landing on the wrong sequence changes the gradient.
  const auto weights = at::linspace(0.5, 2, 8, at::kDouble);
  const auto run = [&](const Batch& b) {
    for (auto& [name, p] : named_parameters(m)) p.mutable_grad() = at::Tensor();
    const auto r = response_logprobs(m, b);
    (r.sum.to(at::kCPU, at::kDouble) * weights).sum().backward();
    std::vector<at::Tensor> out{r.sum.detach().to(at::kCPU, at::kDouble), r.count.to(at::kCPU, at::kDouble)};
    for (auto& [name, p] : named_parameters(m)) out.push_back(p.grad().to(at::kCPU, at::kDouble));
    return out;
  };
  const auto a = run(padded.seqs), b = run(packed.seqs);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_TRUE(a[1].equal(b[1]));
  const double tol = cuda ? 2e-2 : 1e-5;
  for (size_t i = 0; i < a.size(); ++i) {
    const double scale = a[i].abs().max().item<double>();
    ASSERT_GT(scale, 0) << i;
    EXPECT_LE((a[i] - b[i]).abs().max().item<double>(), tol * scale) << i;
  }
}

}  // namespace
}  // namespace aligner
