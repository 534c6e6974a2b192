// Where the one-CTA selection's time goes, phase by phase (the qcodes step's select_blocks: topk,
// sum aggregation over the GQA group, given head scores). A standalone program, built with the
// phase clocks of radar_select.cuh switched on (the library never defines the macro):
//
//   nvcc -std=c++17 -arch=sm_90a -O3 -lineinfo --expt-relaxed-constexpr -DAETHER_SELECT_PHASE_CLOCKS \
//        -Icsrc/include bench/select_phases.cu -o /tmp/select_phases
//   /tmp/select_phases [batch ctx block_size budget]      (default 8 32768 16 0.135)
//
// -DAETHER_SELECT_STAGE_BATCH=8 builds the kernel with 8 staging loads in flight per lane instead
// of 16 (the v24 kernel; radar_select.cuh).
//
// Random head scores (a drift along the row plus noise, as block log-sum-exps look), 32 query and
// 8 KV heads, every sequence full. It launches radar_select_kernel<kTopK> the way the library's
// launcher does at >= 17 rows (one CTA per row, keys and staged scores in shared memory), times it
// with CUDA events (median of 50, no clocks read in between), then reads the clock64() stamps of
// one more launch and prints, per phase, the mean over the rows of its cycles and its share.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "aether/cuda/radar_select.cuh"

#ifndef AETHER_SELECT_PHASE_CLOCKS
#error "build with -DAETHER_SELECT_PHASE_CLOCKS (see the top of this file)"
#endif

#define CHECK(call)                                                                       \
  do {                                                                                    \
    const cudaError_t err_ = (call);                                                      \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

int main(int argc, char** argv) {
  using namespace aether;
  const int batch = argc > 1 ? std::atoi(argv[1]) : 8;
  const int ctx = argc > 2 ? std::atoi(argv[2]) : 32768;
  const int bs = argc > 3 ? std::atoi(argv[3]) : 16;
  const double budget = argc > 4 ? std::atof(argv[4]) : 0.135;
  const int q_heads = 32, kv_heads = 8;
  const int nb = (ctx + bs - 1) / bs;
  const int rows = batch * kv_heads;
  if (rows > cuda::kSelectClockRows) {
    std::fprintf(stderr, "at most %d rows\n", cuda::kSelectClockRows);
    return 1;
  }

  std::mt19937_64 rng(7);
  std::normal_distribution<float> noise(0.0f, 1.5f);
  std::vector<float> scores(static_cast<size_t>(batch) * q_heads * nb);
  for (int bq = 0; bq < batch * q_heads; ++bq) {
    const float drift = noise(rng);
    for (int j = 0; j < nb; ++j) scores[static_cast<size_t>(bq) * nb + j] = 4.0f + drift * j / nb + noise(rng);
  }
  std::vector<int32_t> lens(batch, ctx);

  float* d_scores = nullptr;
  int32_t *d_lens = nullptr, *d_selected = nullptr, *d_count = nullptr;
  CHECK(cudaMalloc(&d_scores, scores.size() * sizeof(float)));
  CHECK(cudaMalloc(&d_lens, lens.size() * sizeof(int32_t)));
  CHECK(cudaMalloc(&d_selected, static_cast<size_t>(rows) * nb * sizeof(int32_t)));
  CHECK(cudaMalloc(&d_count, rows * sizeof(int32_t)));
  CHECK(cudaMemcpy(d_scores, scores.data(), scores.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_lens, lens.data(), lens.size() * sizeof(int32_t), cudaMemcpyHostToDevice));

  RadarSelectParams p;  // as torch.ops.aether.select_blocks fills it
  p.q = d_scores;       // not read: the scores are given and no M_g is asked for
  p.dtype = DType::kFloat32;
  p.seq_lens = d_lens;
  p.batch = batch;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.head_dim = 128;
  p.block_size = bs;
  p.num_blocks = nb;
  p.score = Score::kSketch;
  p.policy = Policy::kTopK;
  p.group_agg = GroupAgg::kSum;
  p.budget_blocks = static_cast<int32_t>(std::ceil(budget * nb));
  p.sink_blocks = 1;
  p.recent_blocks = 1;
  p.in_head_scores = d_scores;
  p.selected = d_selected;
  p.num_selected = d_count;

  cuda::RadarWorkspace ws;
  void* d_ws = nullptr;
  const size_t ws_bytes = cuda::radar_workspace_layout(p, nullptr, nullptr);
  CHECK(cudaMalloc(&d_ws, std::max<size_t>(ws_bytes, 256)));
  cuda::radar_workspace_layout(p, d_ws, &ws);

  // The launcher's choice (radar_select.cu, launch_select), one CTA per row.
  int optin = 0, clock_khz = 0, device = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  const cuda::SelectLaunchShape shape = cuda::radar_select_launch_shape(p, static_cast<size_t>(optin));
  const bool in_shared = shape.in_shared, staged = shape.staged;
  const size_t dynamic = shape.dynamic;
  auto kernel = cuda::radar_select_kernel<Policy::kTopK>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic)));
  auto launch = [&] {
    kernel<<<rows, cuda::kSelectThreads, dynamic>>>(p, ws, in_shared ? 1 : 0, staged ? 1 : 0);
    CHECK(cudaGetLastError());
  };

  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 5; ++i) launch();
  std::vector<float> times;
  for (int i = 0; i < 50; ++i) {
    CHECK(cudaEventRecord(start));
    launch();
    CHECK(cudaEventRecord(stop));
    CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  std::sort(times.begin(), times.end());

  void* d_clocks = nullptr;
  CHECK(cudaGetSymbolAddress(&d_clocks, cuda::g_select_clocks));
  const size_t clock_bytes = sizeof(long long) * cuda::kSelectClockRows * cuda::kSelectClockPhases;
  CHECK(cudaMemset(d_clocks, 0, clock_bytes));
  launch();
  CHECK(cudaDeviceSynchronize());
  std::vector<long long> clocks(static_cast<size_t>(cuda::kSelectClockRows) * cuda::kSelectClockPhases);
  CHECK(cudaMemcpy(clocks.data(), d_clocks, clock_bytes, cudaMemcpyDeviceToHost));
  std::vector<int32_t> counts(rows);
  CHECK(cudaMemcpy(counts.data(), d_count, rows * sizeof(int32_t), cudaMemcpyDeviceToHost));

  const char* names[] = {"start",          "stage + max",    "exps + Z_g",  "keys",
                         "radix pass 1",   "radix pass 2",   "radix pass 3", "radix pass 4",
                         "radix done",     "write: counts",  "write: rows"};
  constexpr int kPhases = 11;
  double mean[kPhases] = {};
  int seen[kPhases] = {};
  double total = 0.0;
  for (int r = 0; r < rows; ++r) {
    const long long* c = &clocks[static_cast<size_t>(r) * cuda::kSelectClockPhases];
    total += static_cast<double>(c[10] - c[0]);
    long long prev = c[0];
    for (int ph = 1; ph < kPhases; ++ph) {
      if (c[ph] == 0) continue;  // a pass that did not run (the radix select stopped early)
      mean[ph] += static_cast<double>(c[ph] - prev);
      ++seen[ph];
      prev = c[ph];
    }
  }
  total /= rows;
  const double cycles_per_us = clock_khz / 1000.0;
  std::printf("select_phases: %d x %d, block %d, %d rows of %d blocks, keep %d; kernel %.1f us (median of 50, "
              "CUDA events), %d selected in row 0; dynamic smem %zu, staged %d; stage batch %d\n",
              batch, ctx, bs, rows, nb, p.budget_blocks, 1000.0 * times[times.size() / 2], counts[0], dynamic,
              staged ? 1 : 0, AETHER_SELECT_STAGE_BATCH);
  std::printf("  %-16s %10s %7s %8s %6s   (us at the %.0f MHz clock-rate attribute)\n", "phase", "cycles",
              "share", "us", "rows", cycles_per_us);
  for (int ph = 1; ph < kPhases; ++ph) {
    if (seen[ph] == 0) continue;
    const double cycles = mean[ph] / seen[ph];
    std::printf("  %-16s %10.0f %6.1f%% %8.2f %6d\n", names[ph], cycles, 100.0 * cycles * seen[ph] / rows / total,
                cycles / cycles_per_us, seen[ph]);
  }
  std::printf("  %-16s %10.0f %6.1f%% %8.2f\n", "start -> end", total, 100.0, total / cycles_per_us);
  return 0;
}
