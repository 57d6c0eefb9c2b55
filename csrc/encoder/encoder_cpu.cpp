// The post-norm encoder layer as one sequence of kernel calls (encoder.h).
#include <cmath>
#include <vector>

#include "../attention/attention.h"
#include "../common/checks.h"
#include "../int8/int8.h"
#include "encoder.h"

namespace pk {
namespace encoder {

namespace {

// The layer's float intermediates, per calling thread: they only grow, so a
// model's layers (and its later calls) reuse them instead of faulting in
// fresh pages every time (at 32 x 128 tokens the FFN's alone is 25 MiB).
float* buffer(int slot, int64_t count) {
  static thread_local std::vector<float> bufs[4];
  std::vector<float>& v = bufs[slot];
  if (int64_t(v.size()) < count) v.resize(static_cast<size_t>(count));
  return v.data();
}

void linear(const Linear& l, const float* x, int64_t m, float* y, int act_bits,
            const int8::Epilogue& ep = int8::Epilogue{}) {
  int8::linear_dynamic_cpu(x, DType::f32, m, l.k, l.k, l.packed, l.comp, l.scale, l.bias, l.n, y,
                           DType::f32, act_bits, ep);
}

}  // namespace

void post_norm_block_cpu(const PostNormBlock& blk, const float* x, int64_t batch, int64_t seq,
                         const int64_t* kv_len, float* y) {
  const int64_t hidden = blk.qkv.k, inner = blk.qkv.n / 3, ffn = blk.ffn1.n;
  PK_CHECK_ARG(batch >= 0 && seq >= 0, "negative batch or sequence length");
  PK_CHECK_ARG(blk.heads > 0 && blk.qkv.n % 3 == 0 && inner % blk.heads == 0, "qkv: ", blk.qkv.n,
               " rows are not 3 x heads x head_dim");
  PK_CHECK_ARG(blk.out.k == inner && blk.out.n == hidden, "out: expected [", hidden, ", ", inner,
               "], got [", blk.out.n, ", ", blk.out.k, "]");
  PK_CHECK_ARG(blk.ffn1.k == hidden, "ffn1: expected ", hidden, " input features, got ",
               blk.ffn1.k);
  PK_CHECK_ARG(blk.ffn2.k == ffn && blk.ffn2.n == hidden, "ffn2: expected [", hidden, ", ", ffn,
               "], got [", blk.ffn2.n, ", ", blk.ffn2.k, "]");
  const int64_t m = batch * seq;
  if (m == 0) return;
  PK_CHECK_ARG(x && y && x != y, "x and y must be distinct, non-null buffers");
  const int64_t d = inner / blk.heads;
  float* qkv = buffer(0, m * 3 * inner);
  float* attn = buffer(1, m * inner);
  float* h = buffer(2, m * hidden);
  float* f = buffer(3, m * ffn);

  linear(blk.qkv, x, m, qkv, blk.act_bits);

  // Q, K and V as strided [batch, heads, seq, d] views of the one QKV
  // output; the result lands as [batch, seq, heads, d], the next GEMM's rows.
  attention::Problem p;
  p.batch = batch;
  p.heads = blk.heads;
  p.sq = p.sk = seq;
  p.d = p.dv = d;
  const attention::View in{seq * 3 * inner, d, 3 * inner};
  p.q = qkv;
  p.k = qkv + inner;
  p.v = qkv + 2 * inner;
  p.qv = p.kv = p.vv = in;
  p.out = attn;
  p.ov = {seq * inner, d, inner};
  p.kv_len = kv_len;
  p.scale = float(1.0 / std::sqrt(double(d)));  // as the Python path's 1 / math.sqrt(d)
  attention::attention_f32_cpu(p);

  const int8::Epilogue end1{.residual = x,
                            .ldr = hidden,
                            .norm = int8::Norm::layer,
                            .gamma = blk.norm1_w,
                            .beta = blk.norm1_b,
                            .eps = blk.eps1};
  linear(blk.out, attn, m, h, blk.act_bits, end1);
  linear(blk.ffn1, h, m, f, blk.act_bits, int8::Epilogue{.act = int8::Act(blk.act)});
  const int8::Epilogue end2{.residual = h,
                            .ldr = hidden,
                            .norm = int8::Norm::layer,
                            .gamma = blk.norm2_w,
                            .beta = blk.norm2_b,
                            .eps = blk.eps2};
  linear(blk.ffn2, f, m, y, blk.act_bits, end2);
}

}  // namespace encoder
}  // namespace pk
