// attention family, torch-free API: softmax(q k^T * scale + mask) v over
// [batch, heads, seq, dim] views with any strides and unit stride along dim.
#pragma once
#include <cstdint>

namespace pk {
namespace attention {

// A [batch, heads, seq, dim] view: element strides of the first three
// dimensions; the last is contiguous.
struct View {
  int64_t sb = 0, sh = 0, ss = 0;
};

struct Problem {
  int64_t batch = 0, heads = 0, sq = 0, sk = 0;
  int64_t d = 0;   // q and k head dim
  int64_t dv = 0;  // v and output head dim
  const float* q = nullptr;
  View qv;
  const float* k = nullptr;
  View kv;
  const float* v = nullptr;
  View vv;
  float* out = nullptr;
  View ov;
  // [batch] or null: keys at positions >= kv_len[b] are left out entirely
  // (a right-padding mask reduced to lengths: no work is spent on them).
  const int64_t* kv_len = nullptr;
  // [batch] or null: output rows at positions >= q_len[b] are written as
  // zeros without being computed (padded query rows of an encoder).
  const int64_t* q_len = nullptr;
  // Null, or an additive float mask: element (b, h, i, j) at
  // mask[b * mv.sb + h * mv.sh + i * mv.ss + j] (zero strides broadcast).
  const float* mask = nullptr;
  View mv;
  // Row i sees keys j <= i (top-left aligned, as torch's is_causal).
  bool causal = false;
  float scale = 1.0f;
};

// out = softmax(q k^T * scale + mask) v per (batch, head), rows whose every
// key is masked (-inf) or left out give zeros, as torch's SDPA does.
// NaN in a row's inputs gives NaN in that row.
void attention_f32_cpu(const Problem& p);

}  // namespace attention
}  // namespace pk
