// Prefill attention (worker/kernels/prefill_attention.h): causal vs the PSAW band, same run.
// One sequence of `ctx` tokens, every position a query row (a whole-prompt prefill of one layer),
// bf16 K/V in 16-token pages, random inputs. Prints one JSON object per context:
//   causal_ms, band_ms, ratio (causal / band) for the simple kernel; tiled_causal_ms,
//   tiled_band_ms, tiled_ratio for the tiled tensor-core kernel (PrefillAttentionTiled), its
//   speedup over the simple one and its causal TFLOP/s (4 · Σ keys · heads · head_dim);
//   tiled_bf16p_causal_ms: the tiled kernel with P rounded to one bf16 (tiled_single_bf16_p,
//   the earlier variant) and split_p_cost = tiled_causal_ms / tiled_bf16p_causal_ms;
//   keys_read_fraction (band keys / causal keys, exact), tile_skip_fraction (the fraction of the
//   causal (64 query × 64 key) tiles lying wholly outside every row's band: what the tiled
//   kernel skips), plus the shape.
// Usage: prefill_bench [--ctx=4096,16384,32768] [--hq=32] [--hkv=8] [--hd=128] [--drop=0.5]
//                      [--sink=8] [--reps=3]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/bench_kernels.h"
#include "bench/bench_util.h"
#include "worker/kernels/prefill_attention.h"

namespace {

// Engine::Step's band: lo = (int64) (f · (p + 1)); banded when f > 0 and lo > sink.
int64_t BandLo(double f, int sink, int64_t p) {
  const int64_t lo = static_cast<int64_t>(f * static_cast<double>(p + 1));
  return (f > 0 && lo > sink) ? lo : -1;
}

struct Options {
  std::vector<int> ctx{4096, 16384, 32768};
  int hq = 32, hkv = 8, hd = 128, sink = 8, reps = 3;
  double drop = 0.5;
};

template <typename T>
T* DeviceCopy(const std::vector<T>& v) {
  T* d = nullptr;
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(v.size(), 1) * sizeof(T)));
  PREHOC_BENCH_CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// The simple kernel (tiles == nullptr) or the tiled one.
double TimeMs(const prehoc::kernels::PrefillAttentionParams& p, int reps, int num_tiles = 0,
              const int32_t* d_tiles = nullptr) {
  return prehoc::bench::TimeLaunchesMs(reps, [&] {
    PREHOC_BENCH_CHECK_CUDA(d_tiles == nullptr
                                ? prehoc::kernels::PrefillAttention(p, nullptr)
                                : prehoc::kernels::PrefillAttentionTiled(p, num_tiles, d_tiles,
                                                                         nullptr));
  });
}

void RunOne(const Options& o, int ctx) {
  const int page = 16;
  const int pages = (ctx + page - 1) / page;
  std::vector<int32_t> indptr{0, pages}, indices(pages), lens{ctx}, row_seq(ctx, 0), row_pos(ctx);
  for (int i = 0; i < pages; ++i) indices[i] = i;
  for (int i = 0; i < ctx; ++i) row_pos[i] = i;
  const size_t pool = static_cast<size_t>(pages) * o.hkv * page * o.hd;
  const size_t qn = static_cast<size_t>(ctx) * o.hq * o.hd;
  uint16_t *dk, *dv, *dq, *dout;
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dk), pool * 2));
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dv), pool * 2));
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dq), qn * 2));
  PREHOC_BENCH_CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&dout), qn * 2));
  PREHOC_BENCH_CHECK_CUDA(prehoc::bench::FillUniform16(dk, pool, 1, true, nullptr));
  PREHOC_BENCH_CHECK_CUDA(prehoc::bench::FillUniform16(dv, pool, 2, true, nullptr));
  PREHOC_BENCH_CHECK_CUDA(prehoc::bench::FillUniform16(dq, qn, 3, true, nullptr));
  int32_t* dip = DeviceCopy(indptr);
  int32_t* dix = DeviceCopy(indices);
  int32_t* dl = DeviceCopy(lens);
  int32_t* drs = DeviceCopy(row_seq);
  int32_t* drp = DeviceCopy(row_pos);
  double* dbf = DeviceCopy(std::vector<double>{o.drop});
  int32_t* dbs = DeviceCopy(std::vector<int32_t>{o.sink});

  prehoc::kernels::PrefillAttentionParams p;
  p.rows = ctx;
  p.num_q_heads = o.hq;
  p.num_kv_heads = o.hkv;
  p.head_dim = o.hd;
  p.page_size = page;
  p.causal = true;
  p.d_q = dq;
  p.d_out = dout;
  p.d_k_pool = dk;
  p.d_v_pool = dv;
  p.d_page_indptr = dip;
  p.d_page_indices = dix;
  p.d_seq_lens = dl;
  p.d_row_seq = drs;
  p.d_row_pos = drp;
  const std::vector<int32_t> tiles =
      prehoc::kernels::PrefillQueryTiles(row_seq.data(), row_pos.data(), ctx);
  int32_t* dt = DeviceCopy(tiles);
  const int num_tiles = static_cast<int>(tiles.size() / 2);
  const double causal_ms = TimeMs(p, o.reps);
  const double tiled_causal_ms = TimeMs(p, o.reps, num_tiles, dt);
  p.tiled_single_bf16_p = true;
  const double tiled_bf16p_causal_ms = TimeMs(p, o.reps, num_tiles, dt);
  p.tiled_single_bf16_p = false;
  p.d_band_fraction = dbf;
  p.d_band_sink = dbs;
  const double band_ms = TimeMs(p, o.reps);
  const double tiled_band_ms = TimeMs(p, o.reps, num_tiles, dt);

  // Exact key counts, and the (64 × 64) tiles of the causal triangle outside every row's band.
  double causal_keys = 0, band_keys = 0;
  for (int64_t r = 0; r < ctx; ++r) {
    causal_keys += r + 1;
    const int64_t lo = BandLo(o.drop, o.sink, r);
    band_keys += lo < 0 ? r + 1 : o.sink + (r + 1 - lo);
  }
  const int tile = 64;
  int64_t key_tiles = 0, skipped = 0;
  for (int64_t qt = 0; qt * tile < ctx; ++qt) {
    const int64_t first_row = qt * tile;
    const int64_t lo_min = BandLo(o.drop, o.sink, first_row);  // lo grows with the row
    for (int64_t kt = 0; kt <= qt; ++kt) {
      ++key_tiles;
      const int64_t k0 = kt * tile, k1 = k0 + tile;  // keys [k0, k1)
      if (lo_min >= 0 && k0 >= o.sink && k1 <= lo_min) ++skipped;
    }
  }
  std::printf(
      "{\"ctx\": %d, \"hq\": %d, \"hkv\": %d, \"head_dim\": %d, \"drop\": %.3f, \"sink\": %d, "
      "\"causal_ms\": %.3f, \"band_ms\": %.3f, \"ratio\": %.3f, \"tiled_causal_ms\": %.3f, "
      "\"tiled_band_ms\": %.3f, \"tiled_ratio\": %.3f, \"tiled_speedup_causal\": %.2f, "
      "\"causal_tflops_tiled\": %.1f, \"tiled_bf16p_causal_ms\": %.3f, "
      "\"split_p_cost\": %.3f, \"keys_read_fraction\": %.4f, "
      "\"tile_skip_fraction\": %.4f}\n",
      ctx, o.hq, o.hkv, o.hd, o.drop, o.sink, causal_ms, band_ms, causal_ms / band_ms,
      tiled_causal_ms, tiled_band_ms, tiled_causal_ms / tiled_band_ms,
      causal_ms / tiled_causal_ms, 4.0 * causal_keys * o.hq * o.hd / (tiled_causal_ms * 1e9),
      tiled_bf16p_causal_ms, tiled_causal_ms / tiled_bf16p_causal_ms, band_keys / causal_keys,
      static_cast<double>(skipped) / key_tiles);
  std::fflush(stdout);
  for (void* d : {static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dq),
                  static_cast<void*>(dout), static_cast<void*>(dip), static_cast<void*>(dix),
                  static_cast<void*>(dl), static_cast<void*>(drs), static_cast<void*>(drp),
                  static_cast<void*>(dbf), static_cast<void*>(dbs), static_cast<void*>(dt)}) {
    PREHOC_BENCH_CHECK_CUDA(cudaFree(d));
  }
}

bool Flag(const char* arg, const char* name, std::string* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (Flag(argv[i], "--ctx", &v)) {
      o.ctx.clear();
      for (size_t pos = 0; pos < v.size();) {
        const size_t end = std::min(v.find(',', pos), v.size());
        o.ctx.push_back(std::atoi(v.substr(pos, end - pos).c_str()));
        pos = end + 1;
      }
    } else if (Flag(argv[i], "--hq", &v)) {
      o.hq = std::atoi(v.c_str());
    } else if (Flag(argv[i], "--hkv", &v)) {
      o.hkv = std::atoi(v.c_str());
    } else if (Flag(argv[i], "--hd", &v)) {
      o.hd = std::atoi(v.c_str());
    } else if (Flag(argv[i], "--drop", &v)) {
      o.drop = std::atof(v.c_str());
    } else if (Flag(argv[i], "--sink", &v)) {
      o.sink = std::atoi(v.c_str());
    } else if (Flag(argv[i], "--reps", &v)) {
      o.reps = std::atoi(v.c_str());
    } else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  for (int ctx : o.ctx) RunOne(o, ctx);
  return 0;
}
