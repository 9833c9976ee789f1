// On-device sampling (worker/kernels/sampling.h) vs the device argmax (model_ops.h ArgMaxRows)
// and vs the host path it replaces (copy the logits to the host, Sampler's sort-based draw), same
// run. Logits: N(0, 3²) f32, vocab 128256 (Llama-3). Prints one JSON object per (rows, options).
// Usage: sampling_bench [--vocab=128256] [--reps=20]
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "worker/kernels/model_ops.h"
#include "worker/kernels/sampling.h"
#include "worker/sampler.h"

namespace {

template <typename F>
double TimeUs(int reps, F&& launch) {
  return 1000.0 * prehoc::bench::TimeLaunchesMs(reps, launch);
}

}  // namespace

int main(int argc, char** argv) {
  int vocab = 128256, reps = 20;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--vocab=", 8) == 0) {
      vocab = std::atoi(argv[i] + 8);
    } else if (std::strncmp(argv[i], "--reps=", 7) == 0) {
      reps = std::atoi(argv[i] + 7);
    } else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  const int max_rows = 64;
  std::vector<float> logits(static_cast<size_t>(max_rows) * vocab);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (float& x : logits) x = nd(rng);
  float* dl = nullptr;
  prehoc::kernels::SamplingRow* dp = nullptr;
  int32_t* dout = nullptr;
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dl), logits.size() * sizeof(float)));
  PREHOC_BENCH_CHECK_CUDA(cudaMemcpy(dl, logits.data(), logits.size() * sizeof(float), cudaMemcpyHostToDevice));
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dp), max_rows * sizeof(prehoc::kernels::SamplingRow)));
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dout), max_rows * sizeof(int32_t)));
  std::vector<float> host_row(vocab);
  float* pinned = nullptr;
  PREHOC_BENCH_CHECK_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned), static_cast<size_t>(max_rows) * vocab * sizeof(float)));

  struct Variant {
    const char* name;
    prehoc::SamplingOptions o;
  };
  const Variant variants[] = {{"top_p_0.9", {0.8f, 0, 0.9f, 7}},
                              {"top_k_50_top_p_0.9", {0.8f, 50, 0.9f, 7}},
                              {"temperature_only", {1.0f, 0, 1.0f, 7}}};
  for (int rows : {1, 16, 64}) {
    const double argmax_us = TimeUs(reps, [&] {
      PREHOC_BENCH_CHECK_CUDA(prehoc::kernels::ArgMaxRows(dl, rows, vocab, dout, nullptr));
    });
    for (const Variant& v : variants) {
      std::vector<prehoc::kernels::SamplingRow> rp(rows);
      for (int r = 0; r < rows; ++r) {
        rp[r].temperature = v.o.temperature;
        rp[r].top_k = v.o.top_k;
        rp[r].top_p = v.o.top_p;
        rp[r].seed = v.o.seed + r;
      }
      PREHOC_BENCH_CHECK_CUDA(cudaMemcpy(dp, rp.data(), rows * sizeof(rp[0]), cudaMemcpyHostToDevice));
      prehoc::kernels::SampleRowsParams p;
      p.rows = rows;
      p.vocab = vocab;
      p.d_logits = dl;
      p.d_row_params = dp;
      p.d_out = dout;
      const double device_us = TimeUs(reps, [&] { PREHOC_BENCH_CHECK_CUDA(prehoc::kernels::SampleRows(p, nullptr)); });
      // Host path: copy the rows to pinned memory, then Sampler's draw per row.
      const int host_reps = 3;
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < host_reps; ++i) {
        PREHOC_BENCH_CHECK_CUDA(cudaMemcpy(pinned, dl, static_cast<size_t>(rows) * vocab * sizeof(float),
                              cudaMemcpyDeviceToHost));
        for (int r = 0; r < rows; ++r) {
          prehoc::SampleWithUniform(
              std::span<const float>(pinned + static_cast<size_t>(r) * vocab, vocab), v.o, 0.5);
        }
      }
      const double host_us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
          host_reps;
      std::printf(
          "{\"vocab\": %d, \"rows\": %d, \"variant\": \"%s\", \"device_us\": %.1f, "
          "\"device_argmax_us\": %.1f, \"host_copy_and_sample_us\": %.1f, "
          "\"host_over_device\": %.1f}\n",
          vocab, rows, v.name, device_us, argmax_us, host_us, host_us / device_us);
      std::fflush(stdout);
    }
  }
  return 0;
}
