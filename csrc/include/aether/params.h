// Torch-free parameter structs shared by the CPU kernels, the CUDA kernels and the torch glue.
//
// Every stage of AETHER takes one of these structs by value. They carry raw pointers, sizes and
// element strides only, so the kernels build without torch and the GoogleTest binary can drive
// them directly. The exact semantics of every field is in docs/architecture.md ("Semantics");
// aether/reference.py is the executable form of that text.
#pragma once

#include <cstdint>

namespace aether {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Radar scores, all in logit units (already multiplied by the softmax scale).
enum class Score : int32_t {
  kBall = 0,      // q.mu + |q| r                        upper bound of max_j q.k_j
  kBox = 1,       // sum_i max(q_i lo_i, q_i hi_i)        upper bound (Quest)
  kTight = 2,     // min(ball, box)                       upper bound
  kMean = 3,      // q.mu                                 lower bound, an estimate
  kVariance = 4,  // q.mu + |q| r (1 + sqrt(spread))      heuristic, ranking only
  kSketch = 5,    // "qsketch": log-sum-exp over the block's tokens of approximate logits read from a
                  // 4-bit key sketch (KeySketchParams), an estimate of the block's log mass
};

// How the G query heads of a KV head's group combine their block scores into one top-k priority.
enum class GroupAgg : int32_t {
  kMax = 0,  // S_j = max_g s_gj
  kSum = 1,  // S_j = sum_g softmax_j(s_g.)_j: each head's estimated mass share, summed
};

// Key sketches hold kSketchBits-bit codes; ranks are even (two codes per byte) and at most 16.
constexpr int kSketchBits = 4;
constexpr int kSketchLevels = (1 << kSketchBits) - 1;  // codes 0..15
constexpr int kMaxSketchRank = 16;

enum class Policy : int32_t { kTopK = 0, kThreshold = 1, kAdaptive = 2 };

// Where token t of sequence b, KV head h lives.
//   contiguous (block_table == nullptr): data + b*stride_seq + h*stride_head + t*stride_token
//   paged: page = block_table[b*block_table_stride + t/page_size],
//          data + page*stride_seq + h*stride_head + (t%page_size)*stride_token
// Strides are in elements; the head_dim axis is always contiguous (stride 1).
struct KVLayout {
  const void* data = nullptr;
  int64_t stride_seq = 0;    // batch stride (contiguous) or page stride (paged)
  int64_t stride_head = 0;
  int64_t stride_token = 0;
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;  // max_pages per sequence
  int32_t page_size = 0;           // paged only; equals block_size
};

// Per-block statistics, float32, laid out [batch, kv_heads, num_blocks(, head_dim)] contiguous.
struct BlockStatsTensors {
  float* centroid = nullptr;  // [B, Hkv, NB, D]  mean of the block's keys
  float* lo = nullptr;        // [B, Hkv, NB, D]  channel-wise min
  float* hi = nullptr;        // [B, Hkv, NB, D]  channel-wise max
  float* radius = nullptr;    // [B, Hkv, NB]     max_j |k_j - mu|
  float* spread = nullptr;    // [B, Hkv, NB]     mean_j |k_j - mu|^2
};

// block_stats: compute the statistics of blocks [first_block[b], ceil(seq_lens[b]/block_size))
// of every (b, h). With first_block == nullptr this is a full build that also writes zeros into
// the blocks past the end of each sequence, so that every element of the outputs is written.
// With first_block set (append after new tokens) only the listed blocks are written; a block is
// always recomputed from all of its tokens, so an append gives bit-identical results to a full
// build and costs O(block_size * head_dim) per head, independent of the sequence length.
struct BlockStatsParams {
  KVLayout k;
  DType dtype = DType::kFloat32;
  const int32_t* seq_lens = nullptr;     // [B], 0 <= len <= num_blocks * block_size
  const int32_t* first_block = nullptr;  // [B] or nullptr
  int32_t batch = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;  // capacity NB of the stats tensors
  BlockStatsTensors stats;
};

// key_sketch: the token-level key sketch read by Score::kSketch. Its metadata (ranges and
// centroid) belongs to a *sketch block* of P = blocks_per_sketch consecutive blocks (P * block_size
// tokens): the block size is the granularity of selection and decoding, the sketch block that of
// the metadata, so P = 2 selects 32-token blocks for the metadata bytes of 64-token ones. For
// token t of (b, h), its R coefficients x_tr = sum_d key_proj[h, d, r] * k_td (float32) are
// quantised per (sketch block, coefficient) over the sketch block's valid tokens:
// lo_r = bf16(min_t x_tr), hi_r = bf16(max_t x_tr) (round to nearest even),
// step_r = (hi_r - lo_r) / 15 in float32, code_tr = step_r > 0 ?
// clamp(rint((x_tr - lo_r) / step_r), 0, 15) : 0. The centroid is bf16(mean of the sketch block's
// valid keys) (sum in float32, in token order, divided by the count; round to nearest even).
// Invalid tokens get code 0, empty sketch blocks zero ranges and a zero centroid. Byte i of a
// token holds coefficient 2i in bits 0-3 and 2i+1 in bits 4-7. A sketch block is always rebuilt
// from all of its tokens; first_block (append) names a block, and the sketch blocks from the one
// that holds it to the last valid one are rebuilt; first_block == nullptr is a full build that
// writes zeros past the end. num_blocks (the capacity in blocks) is a multiple of P.
struct KeySketchTensors {
  uint8_t* codes = nullptr;       // [B, Hkv, NB, block_size, R / 2]
  uint16_t* ranges = nullptr;     // [B, Hkv, NB / P, 2, R] bfloat16 bit patterns: lo (row 0), hi (row 1)
  uint16_t* centroid = nullptr;   // [B, Hkv, NB / P, D] bfloat16 bit patterns
};

// P = blocks_per_sketch: a power of two, 1..kMaxBlocksPerSketch, with P * block_size <= 128.
constexpr int kMaxBlocksPerSketch = 8;

struct KeySketchParams {
  KVLayout k;
  DType dtype = DType::kFloat32;
  const int32_t* seq_lens = nullptr;     // [B]
  const int32_t* first_block = nullptr;  // [B] or nullptr
  const float* key_proj = nullptr;       // [Hkv, D, R] contiguous
  int32_t batch = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;        // tokens per block (the page size when paged)
  int32_t num_blocks = 0;        // NB, a multiple of blocks_per_sketch
  int32_t blocks_per_sketch = 1; // P
  int32_t rank = 0;  // R, even, 2..kMaxSketchRank
  KeySketchTensors sketch;
};

// key_codes: the second key store of two-stage selection ("refine"). Every channel of every key
// is quantised to `bits` bits (2 or 4) with a bf16 [lo, hi] per (group, channel), a group being
// Pg = blocks_per_group consecutive blocks (a power of two, Pg * block_size <= 128). Over the
// group's valid tokens: lo_d = bf16(min_t k_td), hi_d = bf16(max_t k_td) (round to nearest even),
// step_d = (hi_d - lo_d) / (2^bits - 1) in float32, code_td = step_d > 0 ?
// clamp(rint((k_td - lo_d) / step_d), 0, 2^bits - 1) : 0. Channel d of a token sits at bit d * bits
// of the token's D * bits / 8 bytes (little-endian: byte i holds channels 8i / bits ..). Invalid
// tokens get code 0, empty groups zero ranges. No calibration: the codes are read only for the
// candidate blocks that a first selection kept (refine_scores). Appends work like key_sketch: a
// group is always rebuilt from all of its tokens; first_block (a block) names where to start.
constexpr int kMaxBlocksPerGroup = 8;

struct KeyCodesParams {
  KVLayout k;
  DType dtype = DType::kFloat32;
  const int32_t* seq_lens = nullptr;     // [B]
  const int32_t* first_block = nullptr;  // [B] or nullptr (full build, zeros past the end)
  int32_t batch = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;        // NB, a multiple of blocks_per_group
  int32_t blocks_per_group = 1;  // Pg
  int32_t bits = 2;              // 2 or 4
  // 0: token-major codes [B, Hkv, NB, block_size, D * bits / 8] (what refine_scores reads).
  // 1: channel-major codes [B, Hkv, NB / Pg, D, Pg * block_size * bits / 8]: per group, each
  //    channel's codes of the group's tokens form one run (token t of the group at bit t * bits of
  //    the run, little-endian), so a reader of a few channels reads only their runs (channel_scores;
  //    a 128-token group at 2 bits: 32 bytes per channel, one DRAM sector). Same bytes either way.
  int32_t channel_major = 0;
  // Channel-major only: a channel pool. nullptr: every channel's run is stored (S = D). Else
  // channel_slots[b, h, d] is the slot of channel d's run among the S = stored_channels runs of a
  // group (codes [B, Hkv, NB / Pg, S, run]), and a slot outside [0, S) means "not stored": that
  // channel gets a range but no codes. The ranges always cover all D channels (the qcodes score
  // reads every channel's mid-range). Each slot should be named by at most one channel of a row
  // (two would write one run twice); the build and appends never write a slot no channel names.
  const int32_t* channel_slots = nullptr;  // [B, Hkv, D]
  int32_t stored_channels = 0;             // S, 1..D, with channel_slots
  uint8_t* codes = nullptr;      // layout above
  uint16_t* ranges = nullptr;    // [B, Hkv, NB / Pg, 2, D] bfloat16 bit patterns: lo (row 0), hi (row 1)
  // Optional, with first_block only (an update): the running spreads of CodeSpreadsParams, brought
  // up to date for the rebuilt groups by the same call (what code_spreads_update would write after
  // it, bit for bit), so that an append needs no second launch. A full build leaves them alone
  // (call code_spreads after it).
  double* spreads = nullptr;     // [B, Hkv, NB / Pg, D] or nullptr
  // CUDA only, a launch choice (the codes are the same bits either way): 1 = CTAs of 64 threads
  // instead of 256, small enough (<= 80 registers per thread, ~5 K per CTA, and ~9 KB of shared
  // memory at 128-token groups of 16-bit keys) that two share an SM with two sparse_decode CTAs,
  // for an update that runs on a side stream beside the decode (codes that trail the cache,
  // sparse_attention(update_codes=True, codes_stream=...)). Alone it is slower: each warp does
  // four times the work.
  int32_t narrow = 0;
};

// code_spreads: the running channel spreads of the channel choice (code_channels below), kept
// beside the ranges so that the choice reads one [D] row per (b, kv head) instead of every group's
// ranges. For groups m of row (b, h), in double, in group order:
//   spreads[b, h, m, d] = (m > 0 ? spreads[b, h, m - 1, d] : 0) + (hi_md - lo_md)^2
// (lo / hi the bf16 ranges widened to double, the difference and its square rounded to double, no
// fused multiply-add: every implementation computes the same bits). Written for the groups m in
// [first_block[b] / Pg, ceil(seq_len / (Pg * block_size))) (at most NB / Pg), first_block nullptr
// meaning 0: a build; with first_block, an update after appending, which reads the row's spread of
// group first_block / Pg - 1 (it must be current). Other groups are not touched. Because group m's
// entry depends only on groups 0..m, an update equals a build, and a row whose length shrank reads
// the entry of its new last group, which is still current.
struct CodeSpreadsParams {
  const uint16_t* ranges = nullptr;     // [B, Hkv, NB / Pg, 2, D] bf16 bits (KeyCodesParams)
  const int32_t* seq_lens = nullptr;    // [B]
  const int32_t* first_block = nullptr;  // [B] or nullptr
  int32_t batch = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;        // NB, a multiple of blocks_per_group
  int32_t blocks_per_group = 1;  // Pg
  double* spreads = nullptr;     // [B, Hkv, NB / Pg, D]
};

// code_channels: the channels the "qcodes" score reads, chosen per (b, kv head) and decode step.
// Over the valid groups m < ceil(seq_len / (Pg * block_size)) (at most NB / Pg) of the row, in
// double: w_d = (sum_g q_gd^2) * sum_m (hi_md - lo_md)^2, g over the KV head's G query heads (q
// converted to float, then to double; lo / hi the bf16 ranges). The num_channels largest w_d win,
// a tie going to the lower channel; channels[b, h, :] lists them ascending. w_d is where a coarse
// (mid-range) value of channel d would move the group's logits most: q_d^2 times its spread.
// Sums may run in any order (double: a different order changes w_d by ~1e-16 relative).
// With spreads (CodeSpreadsParams, current for the row's valid groups) the sum over m is read as
// spreads[b, h, n - 1, d] (n = the valid groups; 0 when n = 0) instead of summed from the ranges.
struct CodeChannelsParams {
  const void* q = nullptr;  // [B, Hq, D], head_dim contiguous
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  DType dtype = DType::kFloat32;
  const uint16_t* ranges = nullptr;  // [B, Hkv, NB / Pg, 2, D] as KeyCodesParams (either layout)
  const int32_t* seq_lens = nullptr;
  int32_t batch = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;        // NB of the codes, a multiple of blocks_per_group
  int32_t blocks_per_group = 1;  // Pg
  int32_t num_channels = 0;      // m, 1..head_dim
  // A channel pool (KeyCodesParams::channel_slots): only channels d with 0 <= channel_slots[b, h, d]
  // < stored_channels may be chosen. When fewer than m are, the list ends with -1 entries.
  const int32_t* channel_slots = nullptr;  // [B, Hkv, D] or nullptr (every channel)
  int32_t stored_channels = 0;
  const double* spreads = nullptr;  // [B, Hkv, NB / Pg, D] or nullptr (sum the ranges)
  int32_t* channels = nullptr;   // [B, Hkv, m] ascending channel ids (then -1 entries, see above)
};

// channel_scores: the "qcodes" score of every block from the channel-major codes of the chosen
// channels (code_channels). Query head g of KV head h scores valid token t of block j, in group
// m = j / Pg, as s * sum_d q_gd k'_td with k'_td = lo_md + code_td step_md for the chosen
// channels of (b, h) (channels[b, h, :]; entries outside [0, D) are ignored, a channel listed twice
// counts once) and k'_td = (lo_md + hi_md) / 2
// for the others (float32; step as KeyCodesParams), and the block as the natural log-sum-exp of
// its valid tokens' logits, written to head_scores[b, g, j]; blocks j >= ceil(seq_len / bs) get
// -inf. Every element of head_scores is written. Float sums in any order (tests use a tolerance).
// channels nullptr: the kernel chooses them itself, as code_channels with spreads does (the
// num_channels largest w_d among the stored channels, from spreads[b, h, n - 1, :]), so the choice
// costs no launch and no list in memory; the scores then equal those of channel_scores given
// code_channels' list.
// Bytes read per (b, h): the chosen channels' runs of every valid group and the group's ranges.
struct ChannelScoresParams {
  const void* q = nullptr;  // [B, Hq, D], head_dim contiguous
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  DType dtype = DType::kFloat32;
  const uint8_t* codes = nullptr;     // channel-major (KeyCodesParams::channel_major = 1)
  const uint16_t* ranges = nullptr;   // [B, Hkv, NB / Pg, 2, D]
  const int32_t* seq_lens = nullptr;
  const int32_t* channels = nullptr;  // [B, Hkv, num_channels], or nullptr: chosen from spreads
  const double* spreads = nullptr;    // [B, Hkv, NB / Pg, D] (CodeSpreadsParams), with channels nullptr
  // A channel pool (KeyCodesParams::channel_slots): codes [B, Hkv, NB / Pg, S, run], channel d's
  // run at slot channel_slots[b, h, d]; a listed channel whose slot is outside [0, S) is ignored
  // (scored at its mid-range, like an entry outside [0, D)). nullptr: S = D, slot d = d.
  const int32_t* channel_slots = nullptr;  // [B, Hkv, D]
  int32_t stored_channels = 0;             // S (the codes' dim 3)
  int32_t batch = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;        // NB of the codes, a multiple of blocks_per_group
  int32_t blocks_per_group = 1;  // Pg
  int32_t bits = 2;
  int32_t num_channels = 0;      // m, 1..head_dim
  float scale = 1.0f;
  float* head_scores = nullptr;  // [B, Hq, NB]
  // CUDA only: 1, each group's log-sum-exps take the group's max per head as their reference
  // (falling back to per-m-tile maxima where that would lose a block to underflow); 0, always the
  // per-m-tile maxima. The scores agree to float rounding. The launcher sets 0 under
  // AETHER_CHANNEL_LSE=tile (a comparison in the same build).
  int32_t lse_group_max = 1;
};

// refine_scores: the second stage of two-stage selection. For each (b, kv head h) and each of the
// first num_candidates[b, h] entries j of candidates[b, h, :] with 0 <= j < ceil(seq_len / bs),
// j < num_blocks and j < list_length,
// and each query head g of h's group, the natural log-sum-exp over block j's valid tokens t of
// scale * sum_d q_gd (lo_d + code_td step_d) (the group's ranges; float32) is written to
// head_scores[b, g, j]. Nothing else is written: the caller fills the array with -inf first, so
// radar_select given these scores (in_head_scores) ranks the candidates only.
struct RefineScoresParams {
  const void* q = nullptr;  // [B, Hq, D], head_dim contiguous
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  DType dtype = DType::kFloat32;
  const uint8_t* codes = nullptr;   // as KeyCodesParams
  const uint16_t* ranges = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* candidates = nullptr;      // [B, Hkv, L] (radar_select's selected), L = list_length
  const int32_t* num_candidates = nullptr;  // [B, Hkv]
  int32_t batch = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;   // NB of the codes
  int32_t list_length = 0;  // L: the first selection's row length (its own block capacity)
  int32_t blocks_per_group = 1;
  int32_t bits = 2;
  float scale = 1.0f;
  float* head_scores = nullptr;  // [B, Hq, L]
};

// union_blocks: per (b, kv head), the blocks named by the first counts[b, h] entries of indices
// or by the first extra_counts[b, h] entries of extra (counts clamp to [0, row length]; entries
// outside [0, num_blocks) are ignored), written once each in ascending order to out[b, h, :] (the
// rest of the row is -1) with their number in out_counts[b, h]. Two-stage selection joins the last
// step's final blocks to the first stage's candidates with it (aether.reference.union_blocks).
struct UnionBlocksParams {
  const int32_t* indices = nullptr;       // [B, Hkv, indices_length]
  const int32_t* counts = nullptr;        // [B, Hkv]
  const int32_t* extra = nullptr;         // [B, Hkv, extra_length]
  const int32_t* extra_counts = nullptr;  // [B, Hkv]
  int32_t batch = 0;
  int32_t kv_heads = 0;
  int32_t indices_length = 0;
  int32_t extra_length = 0;
  int32_t num_blocks = 0;          // NB: the row length of out
  int32_t* out = nullptr;          // [B, Hkv, NB]
  int32_t* out_counts = nullptr;   // [B, Hkv]
};

// radar_select: score every valid block of (b, kv_head) for the G = q_heads / kv_heads query
// heads of its group, aggregate over the group and pick blocks by the policy. Writes the selected
// block indices in ascending order into selected[b, h, 0:count] (the rest of the row is -1) and
// count into num_selected[b, h]. See docs/architecture.md ("Semantics") for the exact rules.
//
// in_head_scores / in_head_mlo: when set, the scores are taken from there instead of computed
// from q and the statistics (tests use this to check that selection is identical given the same
// scores; two-stage selection passes the refined scores this way, without M_g). in_head_mlo null
// with given scores: M_g is -inf unless needed (threshold, out_head_mlo) and computable from q.
// out_head_scores / out_head_mlo: when set, the per-query-head scores and the threshold policy's
// lower bound M_g of the largest logit are written there.
struct RadarSelectParams {
  const void* q = nullptr;  // [B, Hq, D], head_dim contiguous
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  DType dtype = DType::kFloat32;
  const float* centroid = nullptr;
  const float* lo = nullptr;
  const float* hi = nullptr;
  const float* radius = nullptr;
  const float* spread = nullptr;
  // Score::kSketch: query head g (KV head h = g / G) scores valid token t of block j, in sketch
  // block m = j / P, as
  //   s * (sum_r u_gr (lo_mr + code_tr step_mr) + a * (q_g - key_proj_h u_g) . c_m),
  //   u_g = query_proj_g^T q_g, a = centroid_weight, c_m the sketch's bf16 centroid (read only
  //   when a != 0; the block statistics are not read),
  // and the block as the natural log-sum-exp of its valid tokens' logits.
  const uint8_t* sketch_codes = nullptr;        // [B, Hkv, NB, block_size, R / 2]
  const uint16_t* sketch_ranges = nullptr;      // [B, Hkv, NB / P, 2, R] bfloat16 bits
  const uint16_t* sketch_centroid = nullptr;    // [B, Hkv, NB / P, D] bfloat16 bits
  const float* sketch_key_proj = nullptr;       // [Hkv, D, R]
  const float* sketch_query_proj = nullptr;     // [Hq, D, R]
  int32_t sketch_rank = 0;
  int32_t blocks_per_sketch = 1;                // P; num_blocks is a multiple of it
  float centroid_weight = 0.0f;
  const int32_t* seq_lens = nullptr;
  int32_t batch = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;
  float scale = 1.0f;
  Score score = Score::kTight;
  Policy policy = Policy::kTopK;  // kThreshold needs an upper-bound score (not kMean, kVariance, kSketch)
  // topk only. kSum: m_g = max_j s_gj and Z_g = sum_j exp(s_gj - m_g) over the valid blocks
  // (double), S_j = float(sum_g exp(s_gj - m_g) * (1 / Z_g)) (the reciprocal rounded once, then a
  // multiply: every implementation rounds the same way); a head whose Z_g is not finite and > 0
  // adds nothing; a NaN S_j ranks last.
  GroupAgg group_agg = GroupAgg::kMax;
  int32_t budget_blocks = 0;      // topk: a block count when > 0 ...
  double budget_fraction = 0.0;   // ... else ceil(fraction * n_blocks - 1e-9)
  double eps = 1e-3;              // threshold: certified bound on the dropped attention mass
  double mass = 0.95;             // adaptive: estimated mass to reach (p)
  int32_t min_blocks = 1;         // adaptive clamps on the total count
  int32_t max_blocks = 0;         // 0 means no upper clamp
  int32_t sink_blocks = 1;
  int32_t recent_blocks = 1;
  const float* in_head_scores = nullptr;  // [B, Hq, NB] or nullptr
  const float* in_head_mlo = nullptr;     // [B, Hq] or nullptr
  int32_t* selected = nullptr;            // [B, Hkv, NB]
  int32_t* num_selected = nullptr;        // [B, Hkv]
  float* out_head_scores = nullptr;       // [B, Hq, NB] or nullptr; -inf past the end
  float* out_head_mlo = nullptr;          // [B, Hq] or nullptr
};

// sparse_decode: exact softmax attention of every query head over the tokens of the selected
// blocks (all blocks when selected == nullptr). Output in the input dtype, lse float32 natural
// log; a (b, h) with no token gets a zero output and lse = -inf.
struct SparseDecodeParams {
  const void* q = nullptr;  // [B, Hq, D]
  int64_t q_stride_batch = 0;
  int64_t q_stride_head = 0;
  KVLayout k;
  KVLayout v;
  DType dtype = DType::kFloat32;
  const int32_t* seq_lens = nullptr;
  const int32_t* selected = nullptr;      // [B, Hkv, NB] or nullptr (dense)
  const int32_t* num_selected = nullptr;  // [B, Hkv]
  int32_t batch = 0;
  int32_t q_heads = 0;
  int32_t kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t num_blocks = 0;  // row length of selected
  float scale = 1.0f;
  void* out = nullptr;  // [B, Hq, D]
  int64_t out_stride_batch = 0;
  int64_t out_stride_head = 0;
  float* lse = nullptr;  // [B, Hq] contiguous
  // CUDA split-KV workspace (ignored by the CPU kernels): num_splits partial states per head.
  int32_t num_splits = 1;
  float* partial_out = nullptr;  // [B, Hq, num_splits, D]
  float* partial_lse = nullptr;  // [B, Hq, num_splits]
};

}  // namespace aether
