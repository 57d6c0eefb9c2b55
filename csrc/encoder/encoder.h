// encoder family, torch-free API: a whole post-norm transformer encoder layer
// (BERT, MiniLM, RoBERTa) over int8 projections in one call, composed of the
// int8 linear (int8.h) and attention (attention.h) kernels. What it saves is
// not arithmetic but the time between kernels: at one short query (1 x 32
// tokens) a layer's GEMMs take about 70 us and the Python glue around them
// (views, checks, dispatch, allocations) as long again.
#pragma once
#include <cstdint>

namespace pk {
namespace encoder {

// One int8 projection as the int8 kernels read it: the packed weight and its
// compensation (int8.h, pack_weight_cpu), per-output-channel scales, bias or
// null; y = x W^T for W of n rows and k columns.
struct Linear {
  const int8_t* packed = nullptr;
  const int32_t* comp = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0;
};

// The layer's weights: qkv's rows are Q's, then K's, then V's (3 x inner);
// LayerNorms after the attention (1) and the feed-forward network (2), with
// weight and bias [hidden] (null: ones / zeros).
struct PostNormBlock {
  Linear qkv, out, ffn1, ffn2;
  const float *norm1_w = nullptr, *norm1_b = nullptr, *norm2_w = nullptr, *norm2_b = nullptr;
  float eps1 = 1e-12f, eps2 = 1e-12f;
  int64_t heads = 0;
  int32_t act = 0;  // the int8 epilogue's activation code (int8.h, Act)
  int32_t act_bits = 8;
};

// y = LN2(h + ffn2(act(ffn1(h)))) with h = LN1(x + out(attention(qkv(x)))),
// for x and y [batch * seq, hidden] fp32 (row-major, contiguous; y may not
// alias x), sequences of `seq` tokens, and kv_len [batch] (keys at positions
// >= kv_len[b] left out: a right-padding mask) or null. The same kernels, in
// the same order and with the same arguments, as pykernels.nn.EncoderBlock's
// Python path, so the results are identical to it. Sizes are checked
// (std::invalid_argument).
void post_norm_block_cpu(const PostNormBlock& blk, const float* x, int64_t batch, int64_t seq,
                         const int64_t* kv_len, float* y);

}  // namespace encoder
}  // namespace pk
