// Native CPU kernels of the ucm op contract (see ucm/ops/contract.py for shapes and semantics).
//
// Registered as torch operators in the `ucm_cpu` namespace (torch.ops.ucm_cpu.*), so the file
// needs only the light ATen/library headers and no pybind11: the JIT build stays short.
// The Python wrapper (backends/cpu/ops.py) validates shapes, normalises dtypes/contiguity and
// falls back to the torch reference for anything these kernels do not take.
//
// Parallelism: OpenMP over (row, block) pairs, rows, or (row, kv-head) pairs, with the thread
// count taken from torch (at::get_num_threads) so torch.set_num_threads governs it too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// A per-thread cap: a background retrieval thread asks for 1 so that its parallel regions do
// not start a second OpenMP team next to the engine's own (pinned, spinning) threads.
thread_local int64_t t_thread_cap = 0;

inline int num_threads() {
  const int n = std::max(1, at::get_num_threads());
  return t_thread_cap > 0 ? static_cast<int>(std::min<int64_t>(n, t_thread_cap)) : n;
}

int64_t thread_budget() { return num_threads(); }

void set_thread_cap(int64_t cap) {
  TORCH_CHECK(cap >= 0, "thread cap must be >= 0 (0 = no cap)");
  t_thread_cap = cap;
}

// Every block a row reads (j < ceil(seq_len / bs)) must exist; checked before going parallel,
// since no exception may leave an OpenMP region. Entries past a row's end are never read.
inline void check_rows_in_range(const int64_t* t, const int64_t* s, int64_t B, int64_t M, int64_t bs, int64_t nb,
                                const char* op) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = std::min<int64_t>(std::max<int64_t>(s[b], 0), M * bs);
    const int64_t n_b = (len + bs - 1) / bs;
    for (int64_t j = 0; j < n_b; ++j) {
      TORCH_CHECK_INDEX(t[b * M + j] < nb, op, ": block_table[", b, ", ", j, "] = ", t[b * M + j],
                        " is out of range for ", nb, " cache blocks");
    }
  }
}

// Whether column j of row b is one of the row's blocks: j < ceil(seq_len / bs), the length
// clamped to [0, M * bs] (a row cannot own more blocks than its table holds).
inline bool block_in_row(const int64_t* s, int64_t b, int64_t j, int64_t M, int64_t bs) {
  const int64_t len = std::min<int64_t>(std::max<int64_t>(s[b], 0), M * bs);
  return j < (len + bs - 1) / bs;
}

// Row b and column j of score `item` of a [B, M] table: false, the score set to -inf, when the
// column is past the row's end.
inline bool row_block(int64_t item, int64_t M, const int64_t* s, int64_t bs, float* o, int64_t& b, int64_t& j) {
  b = item / M;
  j = item % M;
  if (block_in_row(s, b, j, M, bs)) return true;
  o[item] = -std::numeric_limits<float>::infinity();
  return false;
}

// Reduce codes over a block's token distances and over a GQA group's query heads: the values of
// ucm.ops.contract.ReduceCode / GroupReduceCode, which the Python side passes (never names);
// `reduce_codes()` / `group_reduce_codes()` echo them so a test holds the two sides equal.
enum Reduce : int64_t { kMin = 0, kMean = 1, kMax = 2 };
enum GroupReduce : int64_t { kGroupMean = 0, kGroupMax = 1 };

std::vector<int64_t> reduce_codes() { return {kMin, kMean, kMax}; }
std::vector<int64_t> group_reduce_codes() { return {kGroupMean, kGroupMax}; }

// The arguments of a block scorer over per-block representations [NB, Hkv, D] (ESA/GSA means,
// Quest's min/max), checked once: q [B, Hq, D] and the representations float32, block_table
// [B, M] and seq_lens [B] int64 with every block a row reads in the cache, group_reduce 0 or 1.
struct BlockScoreArgs {
  at::Tensor q, table, lens;
  int64_t B, hq, d, nb, hkv, M, g;
};

inline BlockScoreArgs check_block_score_args(const char* op, const at::Tensor& q, const at::Tensor& repr,
                                             const at::Tensor& block_table, const at::Tensor& seq_lens,
                                             int64_t block_size, int64_t group_reduce, bool narrow_ok = false) {
  const auto rt = repr.scalar_type();  // narrow_ok: bfloat16 / float8 representations (widened exactly)
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat &&
                        (rt == at::kFloat || (narrow_ok && (rt == at::kBFloat16 || rt == at::kFloat8_e4m3fn))),
                    op, ": q must be float32 and the block representations float32",
                    narrow_ok ? ", bfloat16 or float8_e4m3fn" : "", " here");
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, op,
                    ": block_table and seq_lens must be int64 here");
  TORCH_CHECK_VALUE(q.dim() == 3 && repr.dim() == 3 && block_table.dim() == 2 && seq_lens.dim() == 1, op,
                    ": expected q [B,Hq,D], representations [NB,Hkv,D], block_table [B,M], seq_lens [B]");
  TORCH_CHECK_VALUE(block_size > 0, op, ": block_size must be positive");
  TORCH_CHECK_VALUE(group_reduce == kGroupMean || group_reduce == kGroupMax, op, ": bad group_reduce code");
  BlockScoreArgs a;
  a.q = q.contiguous();
  a.table = block_table.contiguous();
  a.lens = seq_lens.contiguous();
  a.B = a.q.size(0);
  a.hq = a.q.size(1);
  a.d = a.q.size(2);
  a.nb = repr.size(0);
  a.hkv = repr.size(1);
  a.M = a.table.size(1);
  TORCH_CHECK_VALUE(repr.size(2) == a.d, op, ": head dims differ");
  TORCH_CHECK_VALUE(a.hkv > 0 && a.hq % a.hkv == 0, op, ": Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(a.table.size(0) == a.B && a.lens.size(0) == a.B, op, ": batch sizes differ");
  a.g = a.hq / a.hkv;
  if (a.B > 0 && a.M > 0) {
    check_rows_in_range(a.table.data_ptr<int64_t>(), a.lens.data_ptr<int64_t>(), a.B, a.M, block_size, a.nb, op);
  }
  return a;
}

inline int popcount64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcountll(v);  // one `popcnt` with -mpopcnt, a bit-trick sequence otherwise
#else
  v = v - ((v >> 1) & 0x5555555555555555ULL);
  v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
  v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int>((v * 0x0101010101010101ULL) >> 56);
#endif
}

inline uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));  // unaligned-safe; compiles to a single mov
  return v;
}

// ------------------------------------------------------------------------------ sign_bits_pack

template <typename T>
void pack_rows_scalar(const T* x, uint8_t* out, int64_t rows, int64_t n, int64_t nbytes) {
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows * n > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * n;
    uint8_t* orow = out + r * nbytes;
    for (int64_t j = 0; j < nbytes; ++j) {
      const int64_t lo = j * 8;
      const int64_t hi = std::min<int64_t>(lo + 8, n);
      unsigned byte = 0;
      for (int64_t i = lo; i < hi; ++i) {
        // NaN compares false -> bit 0, -0.0 >= 0 -> bit 1: the same as torch's `x >= 0`.
        byte |= static_cast<unsigned>(static_cast<float>(xr[i]) >= 0.0f) << (i - lo);
      }
      orow[j] = static_cast<uint8_t>(byte);
    }
  }
}

void pack_rows_f32(const float* x, uint8_t* out, int64_t rows, int64_t n, int64_t nbytes) {
#if defined(__AVX2__)
  const int64_t full = n / 8;  // bytes made of 8 whole elements
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows * n > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    uint8_t* orow = out + r * nbytes;
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; ++j) {
      // _CMP_GE_OQ: ordered, so NaN -> 0; movemask puts lane i in bit i (little-endian order).
      const __m256 m = _mm256_cmp_ps(_mm256_loadu_ps(xr + 8 * j), zero, _CMP_GE_OQ);
      orow[j] = static_cast<uint8_t>(_mm256_movemask_ps(m));
    }
    if (full < nbytes) {
      unsigned byte = 0;
      for (int64_t i = full * 8; i < n; ++i) byte |= static_cast<unsigned>(xr[i] >= 0.0f) << (i - full * 8);
      orow[full] = static_cast<uint8_t>(byte);
    }
  }
#else
  pack_rows_scalar<float>(x, out, rows, n, nbytes);
#endif
}

at::Tensor sign_bits_pack(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "sign_bits_pack: x needs at least one dimension");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "sign_bits_pack: x must be a CPU tensor");
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(-1);
  const int64_t nbytes = (n + 7) / 8;
  std::vector<int64_t> out_shape(xc.sizes().begin(), xc.sizes().end());
  out_shape.back() = nbytes;
  at::Tensor out = at::empty(out_shape, xc.options().dtype(at::kByte));
  const int64_t rows = n == 0 ? 0 : xc.numel() / n;
  if (rows == 0 || nbytes == 0) return out;
  uint8_t* o = out.data_ptr<uint8_t>();
  switch (xc.scalar_type()) {
    case at::kFloat:
      pack_rows_f32(xc.data_ptr<float>(), o, rows, n, nbytes);
      break;
    case at::kDouble:
      pack_rows_scalar<double>(xc.data_ptr<double>(), o, rows, n, nbytes);
      break;
    case at::kHalf:
      pack_rows_scalar<at::Half>(xc.data_ptr<at::Half>(), o, rows, n, nbytes);
      break;
    case at::kBFloat16:
      pack_rows_scalar<at::BFloat16>(xc.data_ptr<at::BFloat16>(), o, rows, n, nbytes);
      break;
    default:
      TORCH_CHECK_VALUE(false, "sign_bits_pack: unsupported dtype ", xc.scalar_type());
  }
  return out;
}

// ------------------------------------------------------------------------ hamming_block_scores

// Codes are read as W whole little-endian uint64 words plus, when C % 8 != 0, one zero-padded
// tail word (the query side is padded the same way, so padding never counts). `WT` > 0 fixes W
// at compile time (then C == 8 * WT and there is no tail) so the hot loops unroll fully.
template <int WT>
inline uint64_t code_word(const uint8_t* code, int64_t w, int64_t words, int64_t tail) {
  if (WT > 0 || w < words) return load_u64(code + 8 * w);
  uint64_t v = 0;
  std::memcpy(&v, code + 8 * words, static_cast<size_t>(tail));
  return v;
}

struct CodeGeom {
  int64_t hkv, g, c, words, tail, stride;  // stride = words per code incl. the tail word
};

// Small groups (G <= 4): token distance = sum_h sum_g popcount(q[h*G+g] ^ k[h]) directly.
// q words: [B, Hq, stride]. GT > 0 fixes G at compile time.
template <int WT, int GT>
struct DirectDistance {
  const uint64_t* qwords;
  CodeGeom geo;
  inline int64_t operator()(const uint8_t* ktok, int64_t b) const {
    const int64_t G = GT > 0 ? GT : geo.g;
    const int64_t S = WT > 0 ? WT : geo.stride;
    const uint64_t* qrow = qwords + b * geo.hkv * G * S;
    int64_t dist = 0;
    for (int64_t h = 0; h < geo.hkv; ++h) {
      const uint8_t* kh = ktok + h * geo.c;
      const uint64_t* qh = qrow + h * G * S;
      for (int64_t w = 0; w < S; ++w) {
        const uint64_t kv = code_word<WT>(kh, w, geo.words, geo.tail);
        for (int64_t gi = 0; gi < G; ++gi) dist += popcount64(qh[gi * S + w] ^ kv);
      }
    }
    return dist;
  }
};

// Large groups (G >= 5, e.g. MLA's one latent head serving every query head): per bit, the group
// contributes cnt1 (query heads with the bit set) when k's bit is 0 and G - cnt1 when it is 1, so
//   sum_g popcount(q_g ^ k) = sum_g popcount(q_g) + G * popcount(k) - 2 * sum_l 2^l popcount(k & P_l)
// where P_l is bit-plane l of cnt1 (bit-sliced counters built once per row). 1 + log2(G+1)
// popcounts per word instead of G; exact integer arithmetic, so bit-identical distances.
// planes: [B, Hkv, stride, L]; base: [B] = sum over all query heads of popcount(q).
template <int WT>
struct PlaneDistance {
  const uint64_t* planes;
  const int64_t* base;
  CodeGeom geo;
  int64_t L;
  inline int64_t operator()(const uint8_t* ktok, int64_t b) const {
    const int64_t S = WT > 0 ? WT : geo.stride;
    const uint64_t* prow = planes + b * geo.hkv * S * L;
    int64_t ones = 0, weighted = 0;
    for (int64_t h = 0; h < geo.hkv; ++h) {
      const uint8_t* kh = ktok + h * geo.c;
      const uint64_t* ph = prow + h * S * L;
      for (int64_t w = 0; w < S; ++w) {
        const uint64_t kv = code_word<WT>(kh, w, geo.words, geo.tail);
        ones += popcount64(kv);
        const uint64_t* p = ph + w * L;
        for (int64_t l = 0; l < L; ++l) weighted += static_cast<int64_t>(popcount64(kv & p[l])) << l;
      }
    }
    return base[b] + geo.g * ones - 2 * weighted;
  }
};

// OpenMP over (row, block) pairs; each pair streams its block's valid tokens once:
// token_value(b, blk, t) is an integer distance (summed exactly, Sum = int64_t) or a float one
// (summed in double), reduced min / max / mean (the mean rounded once to float32), +inf past the
// row's end.
template <typename V, typename Sum, typename TokenValue>
void reduce_blocks(const TokenValue& token_value, const int64_t* table, const int64_t* seq_lens, float* out,
                   int64_t B, int64_t M, int64_t bs, int64_t reduce) {
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(dynamic, 2) num_threads(num_threads()) if (B * M > 1)
  for (int64_t item = 0; item < B * M; ++item) {
    const int64_t b = item / M;
    const int64_t j = item % M;
    const int64_t len = std::min<int64_t>(std::max<int64_t>(seq_lens[b], 0), M * bs);
    const int64_t n_b = (len + bs - 1) / bs;
    if (j >= n_b) {
      out[item] = inf;  // past the row's end
      continue;
    }
    const int64_t valid = std::min<int64_t>(bs, len - j * bs);
    const int64_t blk = std::max<int64_t>(table[item], 0);  // the reference clamps negative ids to 0
    V lo = std::numeric_limits<V>::max();
    V hi = std::numeric_limits<V>::lowest();
    Sum sum = 0;
    for (int64_t t = 0; t < valid; ++t) {
      const V d = token_value(b, blk, t);
      lo = std::min(lo, d);
      hi = std::max(hi, d);
      sum += d;
    }
    if (reduce == kMin) {
      out[item] = static_cast<float>(lo);
    } else if (reduce == kMax) {
      out[item] = static_cast<float>(hi);
    } else {
      out[item] = static_cast<float>(static_cast<double>(sum) / static_cast<double>(valid));
    }
  }
}

template <int WT>
void hamming_dispatch(const uint8_t* q, const uint8_t* k, const int64_t* table, const int64_t* seq_lens, float* out,
                      int64_t B, int64_t hq, const CodeGeom& geo, int64_t bs, int64_t M, int64_t reduce) {
  const int64_t S = geo.stride;
  const int64_t token_bytes = geo.hkv * geo.c;
  // Query codes of every row as padded words: [B, Hq, S] (tiny: B * Hq * C bytes).
  std::vector<uint64_t> qwords(static_cast<size_t>(B * hq * S), 0);
  for (int64_t r = 0; r < B * hq; ++r) std::memcpy(qwords.data() + r * S, q + r * geo.c, static_cast<size_t>(geo.c));
  auto run = [&](const auto& dist) {
    reduce_blocks<int64_t, int64_t>(
        [&](int64_t b, int64_t blk, int64_t t) { return dist(k + (blk * bs + t) * token_bytes, b); }, table, seq_lens,
        out, B, M, bs, reduce);
  };
  if (geo.g <= 4) {
    const uint64_t* qw = qwords.data();
    switch (geo.g) {
      case 1: run(DirectDistance<WT, 1>{qw, geo}); break;
      case 2: run(DirectDistance<WT, 2>{qw, geo}); break;
      case 3: run(DirectDistance<WT, 3>{qw, geo}); break;
      case 4: run(DirectDistance<WT, 4>{qw, geo}); break;
      default: run(DirectDistance<WT, 0>{qw, geo}); break;  // G == 0 (no query heads): all 0
    }
    return;
  }
  int64_t L = 0;
  while ((int64_t{1} << L) <= geo.g) ++L;  // bits needed to count 0..G
  std::vector<uint64_t> planes(static_cast<size_t>(B * geo.hkv * S * L), 0);
  std::vector<int64_t> base(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < geo.hkv; ++h) {
      for (int64_t w = 0; w < S; ++w) {
        uint64_t* p = planes.data() + ((b * geo.hkv + h) * S + w) * L;
        for (int64_t gi = 0; gi < geo.g; ++gi) {
          uint64_t carry = qwords[((b * hq) + h * geo.g + gi) * S + w];
          base[b] += popcount64(carry);
          for (int64_t l = 0; l < L && carry; ++l) {  // ripple-carry add of one bit per lane
            const uint64_t next = p[l] & carry;
            p[l] ^= carry;
            carry = next;
          }
        }
      }
    }
  }
  run(PlaneDistance<WT>{planes.data(), base.data(), geo, L});
}

at::Tensor hamming_block_scores(const at::Tensor& q_codes, const at::Tensor& k_codes, const at::Tensor& block_table,
                                const at::Tensor& seq_lens, int64_t reduce) {
  TORCH_CHECK_VALUE(q_codes.scalar_type() == at::kByte && k_codes.scalar_type() == at::kByte,
                    "hamming_block_scores: codes must be uint8");
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
                    "hamming_block_scores: block_table and seq_lens must be int64 here");
  TORCH_CHECK_VALUE(q_codes.dim() == 3 && k_codes.dim() == 4 && block_table.dim() == 2 && seq_lens.dim() == 1,
                    "hamming_block_scores: expected q_codes [B,Hq,C], k_codes [NB,bs,Hkv,C], block_table [B,M], "
                    "seq_lens [B]");
  TORCH_CHECK_VALUE(reduce == kMin || reduce == kMean || reduce == kMax, "hamming_block_scores: bad reduce code ",
                    reduce);
  const at::Tensor q = q_codes.contiguous();
  const at::Tensor k = k_codes.contiguous();
  const at::Tensor tbl = block_table.contiguous();
  const at::Tensor sl = seq_lens.contiguous();
  const int64_t B = q.size(0), hq = q.size(1), c = q.size(2);
  const int64_t nb = k.size(0), bs = k.size(1), hkv = k.size(2);
  const int64_t M = tbl.size(1);
  TORCH_CHECK_VALUE(k.size(3) == c, "hamming_block_scores: code widths differ");
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "hamming_block_scores: Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(tbl.size(0) == B && sl.size(0) == B, "hamming_block_scores: batch sizes differ");
  TORCH_CHECK_VALUE(bs > 0, "hamming_block_scores: block size must be positive");
  at::Tensor out = at::empty({B, M}, q.options().dtype(at::kFloat));
  if (B == 0 || M == 0) return out;
  const int64_t* t = tbl.data_ptr<int64_t>();
  const int64_t* s = sl.data_ptr<int64_t>();
  check_rows_in_range(t, s, B, M, bs, nb, "hamming_block_scores");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint8_t* kp = k.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const CodeGeom geo{hkv, hq / hkv, c, c / 8, c % 8, c / 8 + (c % 8 ? 1 : 0)};
  switch (c) {
    case 8: hamming_dispatch<1>(qp, kp, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 16: hamming_dispatch<2>(qp, kp, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 32: hamming_dispatch<4>(qp, kp, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 64: hamming_dispatch<8>(qp, kp, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 72: hamming_dispatch<9>(qp, kp, t, s, o, B, hq, geo, bs, M, reduce); break;
    default: hamming_dispatch<0>(qp, kp, t, s, o, B, hq, geo, bs, M, reduce); break;  // incl. C == 0
  }
  return out;
}

// ------------------------------------------------------------------ hamming_cosine_block_scores

// A norm cache value as float32: float32 in place, bfloat16 by its 16 bits shifted left by 16
// (exact).
inline float norm_value(float v) { return v; }

inline float norm_value(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

// Token estimate of the summed q . k: sum_h |k_h| * sum_g tab[b, h*G+g][popcount(q[h*G+g] ^ k[h])],
// where tab[b, hq][d] = |q_hq| * cos(pi * d / (8 C)) for d = 0..8C is built once per call, so
// the inner loop is a popcount and a table lookup. q words: [B, Hq, S]; tables: [B, Hq, 8C + 1].
template <int WT, typename NT>
struct CosineEstimate {
  const uint64_t* qwords;
  const float* tables;
  CodeGeom geo;
  int64_t tab_len;  // 8C + 1
  inline float operator()(const uint8_t* ktok, const NT* knorm, int64_t b) const {
    const int64_t G = geo.g;
    const int64_t S = WT > 0 ? WT : geo.stride;
    const uint64_t* qrow = qwords + b * geo.hkv * G * S;
    const float* trow = tables + b * geo.hkv * G * tab_len;
    float est = 0.0f;
    for (int64_t h = 0; h < geo.hkv; ++h) {
      const uint8_t* kh = ktok + h * geo.c;
      const uint64_t* qh = qrow + h * G * S;
      const float* th = trow + h * G * tab_len;
      float acc = 0.0f;
      for (int64_t gi = 0; gi < G; ++gi) {
        int64_t d = 0;
        for (int64_t w = 0; w < S; ++w) d += popcount64(qh[gi * S + w] ^ code_word<WT>(kh, w, geo.words, geo.tail));
        acc += th[gi * tab_len + d];
      }
      est += acc * norm_value(knorm[h]);
    }
    return est;
  }
};

template <int WT>
void cosine_dispatch(const uint8_t* q, const float* qn, const uint8_t* k, const void* kn, bool kn_bf16,
                     const int64_t* table, const int64_t* seq_lens, float* out, int64_t B, int64_t hq,
                     const CodeGeom& geo, int64_t bs, int64_t M, int64_t reduce) {
  const int64_t S = geo.stride;
  const int64_t bits = 8 * geo.c;
  const int64_t tab_len = bits + 1;
  std::vector<uint64_t> qwords(static_cast<size_t>(B * hq * S), 0);
  for (int64_t r = 0; r < B * hq; ++r) std::memcpy(qwords.data() + r * S, q + r * geo.c, static_cast<size_t>(geo.c));
  // cos(pi * d / bits) once per distance, then scaled per (row, query head): as the reference,
  // the angle in float32 and the product with |q| rounded to float32.
  std::vector<float> cosines(static_cast<size_t>(tab_len));
  const float step = static_cast<float>(3.14159265358979323846 / static_cast<double>(bits));  // C > 0: checked
  for (int64_t d = 0; d < tab_len; ++d) cosines[d] = std::cos(static_cast<float>(d) * step);
  std::vector<float> tables(static_cast<size_t>(B * hq * tab_len));
  for (int64_t r = 0; r < B * hq; ++r) {
    for (int64_t d = 0; d < tab_len; ++d) tables[r * tab_len + d] = qn[r] * cosines[d];
  }
  const int64_t token_bytes = geo.hkv * geo.c;
  // token distance = -estimate (smaller = closer, as the Hamming scorer's)
  auto run = [&](const auto* norms, const auto& est) {
    reduce_blocks<float, double>(
        [&](int64_t b, int64_t blk, int64_t t) {
          const int64_t at = blk * bs + t;
          return -est(k + at * token_bytes, norms + at * geo.hkv, b);
        },
        table, seq_lens, out, B, M, bs, reduce);
  };
  if (kn_bf16) {
    run(static_cast<const uint16_t*>(kn), CosineEstimate<WT, uint16_t>{qwords.data(), tables.data(), geo, tab_len});
  } else {
    run(static_cast<const float*>(kn), CosineEstimate<WT, float>{qwords.data(), tables.data(), geo, tab_len});
  }
}

at::Tensor hamming_cosine_block_scores(const at::Tensor& q_codes, const at::Tensor& q_norms,
                                       const at::Tensor& k_codes, const at::Tensor& k_norms,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t reduce) {
  TORCH_CHECK_VALUE(q_codes.scalar_type() == at::kByte && k_codes.scalar_type() == at::kByte,
                    "hamming_cosine_block_scores: codes must be uint8");
  TORCH_CHECK_VALUE(q_norms.scalar_type() == at::kFloat, "hamming_cosine_block_scores: q_norms must be float32");
  TORCH_CHECK_VALUE(k_norms.scalar_type() == at::kFloat || k_norms.scalar_type() == at::kBFloat16,
                    "hamming_cosine_block_scores: k_norms must be float32 or bfloat16");
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
                    "hamming_cosine_block_scores: block_table and seq_lens must be int64 here");
  TORCH_CHECK_VALUE(q_codes.dim() == 3 && q_norms.dim() == 2 && k_codes.dim() == 4 && k_norms.dim() == 3 &&
                        block_table.dim() == 2 && seq_lens.dim() == 1,
                    "hamming_cosine_block_scores: expected q_codes [B,Hq,C], q_norms [B,Hq], k_codes [NB,bs,Hkv,C], "
                    "k_norms [NB,bs,Hkv], block_table [B,M], seq_lens [B]");
  TORCH_CHECK_VALUE(reduce == kMin || reduce == kMean || reduce == kMax,
                    "hamming_cosine_block_scores: bad reduce code ", reduce);
  const at::Tensor q = q_codes.contiguous();
  const at::Tensor qn = q_norms.contiguous();
  const at::Tensor k = k_codes.contiguous();
  const at::Tensor kn = k_norms.contiguous();
  const at::Tensor tbl = block_table.contiguous();
  const at::Tensor sl = seq_lens.contiguous();
  const int64_t B = q.size(0), hq = q.size(1), c = q.size(2);
  const int64_t nb = k.size(0), bs = k.size(1), hkv = k.size(2);
  const int64_t M = tbl.size(1);
  TORCH_CHECK_VALUE(k.size(3) == c, "hamming_cosine_block_scores: code widths differ");
  TORCH_CHECK_VALUE(c > 0, "hamming_cosine_block_scores: code width must be positive");
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "hamming_cosine_block_scores: Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(qn.size(0) == B && qn.size(1) == hq, "hamming_cosine_block_scores: q_norms must be [B, Hq]");
  TORCH_CHECK_VALUE(kn.size(0) == nb && kn.size(1) == bs && kn.size(2) == hkv,
                    "hamming_cosine_block_scores: k_norms must be [NB, bs, Hkv] as k_codes");
  TORCH_CHECK_VALUE(tbl.size(0) == B && sl.size(0) == B, "hamming_cosine_block_scores: batch sizes differ");
  TORCH_CHECK_VALUE(bs > 0, "hamming_cosine_block_scores: block size must be positive");
  at::Tensor out = at::empty({B, M}, q.options().dtype(at::kFloat));
  if (B == 0 || M == 0) return out;
  const int64_t* t = tbl.data_ptr<int64_t>();
  const int64_t* s = sl.data_ptr<int64_t>();
  check_rows_in_range(t, s, B, M, bs, nb, "hamming_cosine_block_scores");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* qnp = qn.data_ptr<float>();
  const uint8_t* kp = k.data_ptr<uint8_t>();
  const bool bf16 = kn.scalar_type() == at::kBFloat16;
  const void* knp = kn.data_ptr();
  float* o = out.data_ptr<float>();
  const CodeGeom geo{hkv, hq / hkv, c, c / 8, c % 8, c / 8 + (c % 8 ? 1 : 0)};
  switch (c) {
    case 8: cosine_dispatch<1>(qp, qnp, kp, knp, bf16, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 16: cosine_dispatch<2>(qp, qnp, kp, knp, bf16, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 32: cosine_dispatch<4>(qp, qnp, kp, knp, bf16, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 64: cosine_dispatch<8>(qp, qnp, kp, knp, bf16, t, s, o, B, hq, geo, bs, M, reduce); break;
    case 72: cosine_dispatch<9>(qp, qnp, kp, knp, bf16, t, s, o, B, hq, geo, bs, M, reduce); break;
    default: cosine_dispatch<0>(qp, qnp, kp, knp, bf16, t, s, o, B, hq, geo, bs, M, reduce); break;
  }
  return out;
}

// ---------------------------------------------------------------------------------- block_topk

// Same ranking as the reference: forced blocks first; then the score as double descending
// (invalid and NaN -> -inf); then index ascending. Keep the first counts = min(n_b, M,
// max(k, forced)); emit ids ascending, padded with -1.
template <typename T>
void topk_rows(const T* scores, const int64_t* kk, const bool* must, const int64_t* nblk, int32_t* ids,
               int32_t* counts, int64_t B, int64_t M) {
  const double inf = std::numeric_limits<double>::infinity();
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads()) if (B * M > 4096)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<double> key(static_cast<size_t>(M));
    std::vector<int32_t> order(static_cast<size_t>(M));
    std::vector<char> first(static_cast<size_t>(M), 0);
    const T* s = scores + b * M;
    const bool* f = must + b * M;
    const int64_t n_b = std::min<int64_t>(nblk[b], M);
    int64_t n_forced = 0;
    for (int64_t j = 0; j < M; ++j) {
      double v;
      if (j >= n_b) {
        v = -inf;
      } else if (f[j]) {
        v = inf;
        first[j] = 1;
        ++n_forced;
      } else {
        v = static_cast<double>(s[j]);
        if (std::isnan(v)) v = -inf;
      }
      key[j] = v;
      order[j] = static_cast<int32_t>(j);
    }
    const int64_t cnt = std::min<int64_t>(n_b, std::max<int64_t>(kk[b], n_forced));
    counts[b] = static_cast<int32_t>(cnt);
    const int64_t take = std::min<int64_t>(std::max<int64_t>(cnt, 0), M);
    int32_t* row = ids + b * M;
    if (take > 0 && take < M) {
      const double* kp = key.data();
      const char* fp = first.data();
      auto better = [kp, fp](int32_t a, int32_t c) {
        if (fp[a] != fp[c]) return fp[a] > fp[c];
        return kp[a] > kp[c] || (kp[a] == kp[c] && a < c);
      };
      std::nth_element(order.begin(), order.begin() + (take - 1), order.end(), better);
      std::sort(order.begin(), order.begin() + take);
    }
    for (int64_t j = 0; j < take; ++j) row[j] = order[j];
    for (int64_t j = take; j < M; ++j) row[j] = -1;
  }
}

std::tuple<at::Tensor, at::Tensor> block_topk(const at::Tensor& scores, const at::Tensor& k,
                                              const at::Tensor& must_keep, const at::Tensor& n_blocks) {
  TORCH_CHECK_VALUE(scores.dim() == 2 && must_keep.dim() == 2 && k.dim() == 1 && n_blocks.dim() == 1,
                    "block_topk: expected scores [B,M], k [B], must_keep [B,M], n_blocks [B]");
  TORCH_CHECK_VALUE(must_keep.sizes() == scores.sizes(), "block_topk: must_keep must match scores");
  TORCH_CHECK_VALUE(k.scalar_type() == at::kLong && n_blocks.scalar_type() == at::kLong &&
                        must_keep.scalar_type() == at::kBool,
                    "block_topk: k/n_blocks must be int64 and must_keep bool here");
  const at::Tensor s = scores.contiguous();
  const at::Tensor kk = k.contiguous();
  const at::Tensor mk = must_keep.contiguous();
  const at::Tensor nb = n_blocks.contiguous();
  const int64_t B = s.size(0), M = s.size(1);
  TORCH_CHECK_VALUE(kk.size(0) == B && nb.size(0) == B, "block_topk: batch sizes differ");
  TORCH_CHECK_VALUE(M < std::numeric_limits<int32_t>::max(), "block_topk: too many blocks");
  at::Tensor ids = at::empty({B, M}, s.options().dtype(at::kInt));
  at::Tensor counts = at::empty({B}, s.options().dtype(at::kInt));
  if (B == 0) return {ids, counts};
  const int64_t* kp = kk.data_ptr<int64_t>();
  const bool* mp = mk.data_ptr<bool>();
  const int64_t* np = nb.data_ptr<int64_t>();
  int32_t* ip = ids.data_ptr<int32_t>();
  int32_t* cp = counts.data_ptr<int32_t>();
  if (s.scalar_type() == at::kFloat) {
    topk_rows<float>(s.data_ptr<float>(), kp, mp, np, ip, cp, B, M);
  } else if (s.scalar_type() == at::kDouble) {
    topk_rows<double>(s.data_ptr<double>(), kp, mp, np, ip, cp, B, M);
  } else {
    TORCH_CHECK_VALUE(false, "block_topk: scores must be float32 or float64 here");
  }
  return {ids, counts};
}

// ------------------------------------------------------------------------------ select_rewrite

// block_topk over unit scores fused with BlockSelector.rewrite: expand the kept units to blocks,
// drop blocks past n_blocks, compact their physical ids into a new table and shorten the length.
// One call per layer replaces ~25 small torch ops (their dispatch cost rivals the sparse
// attention itself at decode sizes). Ascending unit ids expand to ascending block ids, so the
// kept logical blocks come out sorted with the padding (-1 / table 0) at the back.
template <typename I>
void rewrite_rows(const int32_t* ids, int64_t U, int64_t ub, const I* table, int64_t M, const int64_t* seq_lens,
                  const int64_t* nblk, int64_t block_size, I* out_table, int64_t* out_logical, int64_t* new_lens,
                  int64_t* kept, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    const int32_t* row = ids + b * U;
    const int64_t n_b = nblk[b];
    I* ot = out_table + b * M;
    int64_t* ol = out_logical + b * M;
    int64_t n = 0;
    for (int64_t j = 0; j < U && n < M; ++j) {
      const int64_t u = row[j];
      if (u < 0) continue;
      for (int64_t t = 0; t < ub && n < M; ++t) {
        const int64_t blk = u * ub + t;
        if (blk >= n_b) break;
        ol[n] = blk;
        ot[n] = table[b * M + blk];
        ++n;
      }
    }
    for (int64_t j = n; j < M; ++j) {
      ol[j] = -1;
      ot[j] = 0;
    }
    kept[b] = n;
    const int64_t last_len = seq_lens[b] - std::max<int64_t>(n_b - 1, 0) * block_size;
    new_lens[b] = n > 0 ? (n - 1) * block_size + last_len : 0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_rewrite(
    const at::Tensor& scores, const at::Tensor& k, const at::Tensor& must_keep, const at::Tensor& n_units,
    const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& n_blocks, int64_t unit_blocks,
    int64_t block_size) {
  TORCH_CHECK_VALUE(scores.dim() == 2 && must_keep.sizes() == scores.sizes() && block_table.dim() == 2,
                    "select_rewrite: expected scores [B,U], must_keep [B,U], block_table [B,M]");
  TORCH_CHECK_VALUE(k.scalar_type() == at::kLong && n_units.scalar_type() == at::kLong &&
                        seq_lens.scalar_type() == at::kLong && n_blocks.scalar_type() == at::kLong &&
                        must_keep.scalar_type() == at::kBool,
                    "select_rewrite: k, n_units, seq_lens, n_blocks must be int64 and must_keep bool here");
  TORCH_CHECK_VALUE(unit_blocks > 0 && block_size > 0, "select_rewrite: unit_blocks and block_size must be positive");
  const at::Tensor s = scores.contiguous();
  const at::Tensor kk = k.contiguous(), mk = must_keep.contiguous(), nu = n_units.contiguous();
  const at::Tensor tb = block_table.contiguous(), sl = seq_lens.contiguous(), nb = n_blocks.contiguous();
  const int64_t B = s.size(0), U = s.size(1), M = tb.size(1);
  TORCH_CHECK_VALUE(tb.size(0) == B && kk.size(0) == B && nu.size(0) == B && sl.size(0) == B && nb.size(0) == B,
                    "select_rewrite: batch sizes differ");
  TORCH_CHECK_VALUE(U < std::numeric_limits<int32_t>::max(), "select_rewrite: too many units");
  at::Tensor ids = at::empty({B, U}, s.options().dtype(at::kInt));
  at::Tensor counts = at::empty({B}, s.options().dtype(at::kInt));
  at::Tensor out_table = at::empty({B, M}, tb.options());
  at::Tensor logical = at::empty({B, M}, tb.options().dtype(at::kLong));
  at::Tensor new_lens = at::empty({B}, sl.options());
  at::Tensor kept = at::empty({B}, sl.options());
  if (B == 0) return {ids, counts, out_table, new_lens, kept, logical};
  if (s.scalar_type() == at::kFloat) {
    topk_rows<float>(s.data_ptr<float>(), kk.data_ptr<int64_t>(), mk.data_ptr<bool>(), nu.data_ptr<int64_t>(),
                     ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), B, U);
  } else if (s.scalar_type() == at::kDouble) {
    topk_rows<double>(s.data_ptr<double>(), kk.data_ptr<int64_t>(), mk.data_ptr<bool>(), nu.data_ptr<int64_t>(),
                      ids.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), B, U);
  } else {
    TORCH_CHECK_VALUE(false, "select_rewrite: scores must be float32 or float64 here");
  }
  if (tb.scalar_type() == at::kInt) {
    rewrite_rows<int32_t>(ids.data_ptr<int32_t>(), U, unit_blocks, tb.data_ptr<int32_t>(), M, sl.data_ptr<int64_t>(),
                          nb.data_ptr<int64_t>(), block_size, out_table.data_ptr<int32_t>(),
                          logical.data_ptr<int64_t>(), new_lens.data_ptr<int64_t>(), kept.data_ptr<int64_t>(), B);
  } else if (tb.scalar_type() == at::kLong) {
    rewrite_rows<int64_t>(ids.data_ptr<int32_t>(), U, unit_blocks, tb.data_ptr<int64_t>(), M, sl.data_ptr<int64_t>(),
                          nb.data_ptr<int64_t>(), block_size, out_table.data_ptr<int64_t>(),
                          logical.data_ptr<int64_t>(), new_lens.data_ptr<int64_t>(), kept.data_ptr<int64_t>(), B);
  } else {
    TORCH_CHECK_VALUE(false, "select_rewrite: block_table must be int32 or int64 here");
  }
  return {ids, counts, out_table, new_lens, kept, logical};
}

// ---------------------------------------------------------------------------- block_scores_dot

inline float dot_f32(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// ------------------------------------------------------------------------------ kvstar_scores

// KVStar's block scores for all rows in one pass over the representations, read in place by
// block id (no per-row gathered copies). Per (row, kv head): channel importance = sum over the
// row's full blocks of |K| sums; keep the `kept_dims` largest channels (ties -> lower index);
// every query of the window and of the GQA group attends (softmax over all n * R merged
// representations, logits = scale * <q, sum> over the kept channels) and each block's score is
// the probability mass it receives, summed over queries, heads and its R representations.
// q [B, W, Hq, D], sums [NB, R, Hkv, D], abs_sums [NB, Hkv, D], block_table [B, M] int64,
// n_full [B] int64 -> [B, M] float32 (-inf past n_full).
at::Tensor kvstar_scores(const at::Tensor& q, const at::Tensor& sums, const at::Tensor& abs_sums,
                         const at::Tensor& block_table, const at::Tensor& n_full, int64_t kept_dims, double scale) {
  TORCH_CHECK_VALUE(q.scalar_type() == at::kFloat && sums.scalar_type() == at::kFloat &&
                        abs_sums.scalar_type() == at::kFloat,
                    "kvstar_scores: q, sums and abs_sums must be float32 here");
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kLong && n_full.scalar_type() == at::kLong,
                    "kvstar_scores: block_table and n_full must be int64 here");
  TORCH_CHECK_VALUE(q.dim() == 4 && sums.dim() == 4 && abs_sums.dim() == 3 && block_table.dim() == 2 &&
                        n_full.dim() == 1,
                    "kvstar_scores: expected q [B,W,Hq,D], sums [NB,R,Hkv,D], abs_sums [NB,Hkv,D], "
                    "block_table [B,M], n_full [B]");
  const at::Tensor qc = q.contiguous(), sc = sums.contiguous(), ac = abs_sums.contiguous();
  const at::Tensor tb = block_table.contiguous(), nf = n_full.contiguous();
  const int64_t B = qc.size(0), W = qc.size(1), Hq = qc.size(2), D = qc.size(3);
  const int64_t NB = sc.size(0), R = sc.size(1), Hkv = sc.size(2), M = tb.size(1);
  TORCH_CHECK_VALUE(sc.size(3) == D && ac.size(0) == NB && ac.size(1) == Hkv && ac.size(2) == D,
                    "kvstar_scores: representation shapes disagree with q");
  TORCH_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, "kvstar_scores: Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(tb.size(0) == B && nf.size(0) == B, "kvstar_scores: batch sizes differ");
  TORCH_CHECK_VALUE(kept_dims >= 1 && kept_dims <= D, "kvstar_scores: kept_dims must be in [1, D]");
  const int64_t G = Hq / Hkv, Kd = kept_dims, NQ = W * G;
  const float ninf = -std::numeric_limits<float>::infinity();
  at::Tensor out = at::full({B, M}, ninf, qc.options());
  const float* qp = qc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  const float* ap = ac.data_ptr<float>();
  const int64_t* tp = tb.data_ptr<int64_t>();
  const int64_t* np = nf.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < std::min<int64_t>(np[b], M); ++j)
      TORCH_CHECK_VALUE(tp[b * M + j] >= 0 && tp[b * M + j] < NB, "kvstar_scores: block id out of range");
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads()) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = std::min<int64_t>(np[b], M);
    if (n <= 0) continue;
    const int64_t* blk = tp + b * M;
    std::vector<double> mass(static_cast<size_t>(n), 0.0);
    std::vector<float> imp(static_cast<size_t>(D));
    std::vector<int32_t> order(static_cast<size_t>(D));
    std::vector<float> qm(static_cast<size_t>(NQ * D));
    std::vector<float> logits(static_cast<size_t>(NQ * n * R));
    for (int64_t h = 0; h < Hkv; ++h) {
      std::fill(imp.begin(), imp.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float* a = ap + (blk[j] * Hkv + h) * D;
        for (int64_t d = 0; d < D; ++d) imp[d] += a[d];
      }
      for (int64_t d = 0; d < D; ++d) order[d] = static_cast<int32_t>(d);
      const float* ip = imp.data();
      std::partial_sort(order.begin(), order.begin() + Kd, order.end(),
                        [ip](int32_t x, int32_t y) { return ip[x] > ip[y] || (ip[x] == ip[y] && x < y); });
      // the window's queries of this head's group, pre-scaled, with the channels outside the kept
      // ones zeroed ([NQ][D], contiguous): a dot product over all D channels then equals one over
      // the kept channels, and runs as contiguous SIMD instead of a gather per channel
      std::fill(qm.begin(), qm.end(), 0.0f);
      for (int64_t w = 0; w < W; ++w)
        for (int64_t g = 0; g < G; ++g) {
          const float* qv = qp + ((b * W + w) * Hq + h * G + g) * D;
          float* dst = qm.data() + (w * G + g) * D;
          for (int64_t c = 0; c < Kd; ++c) dst[order[c]] = qv[order[c]] * fscale;
        }
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t r = 0; r < R; ++r) {
          const float* sv = sp + ((blk[j] * R + r) * Hkv + h) * D;
          for (int64_t t = 0; t < NQ; ++t) {
            const float* qv = qm.data() + t * D;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qv[d] * sv[d];
            logits[t * n * R + j * R + r] = dot;
          }
        }
      }
      for (int64_t t = 0; t < NQ; ++t) {
        float* l = logits.data() + t * n * R;
        float mx = ninf;
        for (int64_t i = 0; i < n * R; ++i) mx = std::max(mx, l[i]);
        double z = 0.0;
        for (int64_t i = 0; i < n * R; ++i) {
          l[i] = std::exp(l[i] - mx);
          z += l[i];
        }
        const double inv = z > 0.0 ? 1.0 / z : 0.0;
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0.0;
          for (int64_t r = 0; r < R; ++r) acc += l[j * R + r];
          mass[j] += acc * inv;
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) op[b * M + j] = static_cast<float>(mass[j]);
  }
  return out;
}

// A representation row of n values as float32: float32 rows are read in place, bfloat16 and
// float8 e4m3 rows widened (exactly) into `buf` first, so every type meets the same dot.
inline const float* widen_row(const float* src, int64_t, float*) { return src; }

inline const float* widen_row(const at::BFloat16* src, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);  // c10's: a 16-bit shift
  return buf;
}

// float8 e4m3fn -> float32 by a 256-entry table, built once (thread-safe static) from c10's own
// conversion, which works bit by bit per value
inline const float* widen_row(const at::Float8_e4m3fn* src, int64_t n, float* buf) {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int v = 0; v < 256; ++v)
      t[v] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(v), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; ++i) buf[i] = table[bits[i]];
  return buf;
}

// group_reduce: kGroupMean (ESA) or kGroupMax (GSA); each row of the representations widened
// as it is read (`widen_row`)

template <typename RT>
void block_scores_dot_rows(const BlockScoreArgs& a, const float* qp, const float* qmean, const RT* rp,
                           int64_t block_size, int64_t group_reduce, float* o) {
  const int64_t B = a.B, hq = a.hq, d = a.d, hkv = a.hkv, M = a.M, g = a.g;
  const int64_t* t = a.table.data_ptr<int64_t>();
  const int64_t* s = a.lens.data_ptr<int64_t>();
  const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(num_threads()) if (B * M * hq * d > 65536)
  {
    std::vector<float> buf(std::is_same<RT, float>::value ? 0 : static_cast<size_t>(hkv * d));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * M; ++item) {
      int64_t b, j;
      if (!row_block(item, M, s, block_size, o, b, j)) continue;
      const float* rep = widen_row(rp + std::max<int64_t>(t[item], 0) * hkv * d, hkv * d, buf.data());
      float total = 0.0f;
      for (int64_t h = 0; h < hkv; ++h) {
        if (group_reduce == kGroupMean) {
          total += dot_f32(qmean + (b * hkv + h) * d, rep + h * d, d);
        } else {
          float best = ninf;
          for (int64_t gi = 0; gi < g; ++gi) {
            const float v = dot_f32(qp + (b * hq + h * g + gi) * d, rep + h * d, d);
            if (v > best || std::isnan(v)) best = v;  // NaN propagates, as in torch's amax
          }
          total += best;
        }
      }
      o[item] = total;
    }
  }
}

at::Tensor block_scores_dot(const at::Tensor& q, const at::Tensor& repr_cache, const at::Tensor& block_table,
                            const at::Tensor& seq_lens, int64_t block_size, int64_t group_reduce) {
  const BlockScoreArgs a =
      check_block_score_args("block_scores_dot", q, repr_cache, block_table, seq_lens, block_size, group_reduce, true);
  const at::Tensor& qc = a.q;
  const at::Tensor rc = repr_cache.contiguous();
  const int64_t B = a.B, hq = a.hq, d = a.d, hkv = a.hkv, M = a.M, g = a.g;
  at::Tensor out = at::empty({B, M}, qc.options().dtype(at::kFloat));
  if (B == 0 || M == 0) return out;
  const float* qp = qc.data_ptr<float>();
  // ESA: average each GQA group's queries once per row: [B, Hkv, D].
  std::vector<float> qmean;
  if (group_reduce == kGroupMean) {
    qmean.assign(static_cast<size_t>(B * hkv * d), 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < hkv; ++h) {
        float* dst = qmean.data() + (b * hkv + h) * d;
        for (int64_t gi = 0; gi < g; ++gi) {
          const float* src = qp + (b * hq + h * g + gi) * d;
          for (int64_t i = 0; i < d; ++i) dst[i] += src[i];
        }
        for (int64_t i = 0; i < d; ++i) dst[i] /= static_cast<float>(g);
      }
  }
  float* o = out.data_ptr<float>();
  switch (rc.scalar_type()) {
    case at::kBFloat16:
      block_scores_dot_rows(a, qp, qmean.data(), rc.data_ptr<at::BFloat16>(), block_size, group_reduce, o);
      break;
    case at::kFloat8_e4m3fn:
      block_scores_dot_rows(a, qp, qmean.data(), rc.data_ptr<at::Float8_e4m3fn>(), block_size, group_reduce, o);
      break;
    default:
      block_scores_dot_rows(a, qp, qmean.data(), rc.data_ptr<float>(), block_size, group_reduce, o);
  }
  return out;
}

// ---------------------------------------------------------------------- paged_decode_attention

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// One (row, kv head): the group's G queries against the row's first `len` tokens, two passes
// (logits, then softmax-weighted V sum) with float32 accumulation.
template <typename KT, typename QT>
void attend_one(const QT* q, const KT* kc, const KT* vc, const int64_t* tbl, int64_t len, int64_t bs, int64_t hkv,
                int64_t h, int64_t g, int64_t d, int64_t dv, float scale, QT* out, float* lse,
                std::vector<float>& qf, std::vector<float>& logits, std::vector<float>& acc, std::vector<float>& kf) {
  qf.resize(static_cast<size_t>(g * d));
  for (int64_t i = 0; i < g * d; ++i) qf[i] = to_f(q[i]);
  logits.resize(static_cast<size_t>(g * std::max<int64_t>(len, 1)));
  acc.assign(static_cast<size_t>(g * dv), 0.0f);
  kf.resize(static_cast<size_t>(std::max(d, dv)));
  const float ninf = -std::numeric_limits<float>::infinity();
  if (len <= 0) {
    for (int64_t gi = 0; gi < g; ++gi) {
      lse[gi] = ninf;
      for (int64_t i = 0; i < dv; ++i) out[gi * dv + i] = static_cast<QT>(0.0f);
    }
    return;
  }
  for (int64_t t = 0; t < len; ++t) {
    const int64_t blk = std::max<int64_t>(tbl[t / bs], 0);
    const KT* kr = kc + ((blk * bs + t % bs) * hkv + h) * d;
    for (int64_t i = 0; i < d; ++i) kf[i] = to_f(kr[i]);
    for (int64_t gi = 0; gi < g; ++gi) logits[gi * len + t] = dot_f32(qf.data() + gi * d, kf.data(), d) * scale;
  }
  for (int64_t gi = 0; gi < g; ++gi) {
    float* lg = logits.data() + gi * len;
    float mx = ninf;
    for (int64_t t = 0; t < len; ++t) mx = std::max(mx, lg[t]);
    float sum = 0.0f;
    if (std::isinf(mx) && mx < 0) {
      for (int64_t t = 0; t < len; ++t) lg[t] = 0.0f;
      lse[gi] = ninf;
      continue;
    }
    for (int64_t t = 0; t < len; ++t) {
      lg[t] = std::exp(lg[t] - mx);
      sum += lg[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < len; ++t) lg[t] *= inv;
    lse[gi] = mx + std::log(sum);
  }
  for (int64_t t = 0; t < len; ++t) {
    const int64_t blk = std::max<int64_t>(tbl[t / bs], 0);
    const KT* vr = vc + ((blk * bs + t % bs) * hkv + h) * dv;
    for (int64_t i = 0; i < dv; ++i) kf[i] = to_f(vr[i]);
    for (int64_t gi = 0; gi < g; ++gi) {
      const float p = logits[gi * len + t];
      float* a = acc.data() + gi * dv;
      const float* vf = kf.data();
#pragma omp simd
      for (int64_t i = 0; i < dv; ++i) a[i] += p * vf[i];
    }
  }
  for (int64_t i = 0; i < g * dv; ++i) out[i] = static_cast<QT>(acc[i]);
}

template <typename KT, typename QT>
void attend_all(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& tbl,
                const at::Tensor& sl, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t bs = kc.size(1), hkv = kc.size(2), dv = vc.size(3);
  const int64_t M = tbl.size(1);
  const int64_t g = hq / hkv;
  const QT* qp = q.data_ptr<QT>();
  const KT* kp = kc.data_ptr<KT>();
  const KT* vp = vc.data_ptr<KT>();
  const int64_t* tp = tbl.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  QT* op = out.data_ptr<QT>();
  float* lp = lse.data_ptr<float>();
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> qf, logits, acc, kf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * hkv; ++item) {
      const int64_t b = item / hkv;
      const int64_t h = item % hkv;
      const int64_t len = std::min<int64_t>(std::max<int64_t>(sp[b], 0), M * bs);
      attend_one<KT, QT>(qp + (b * hq + h * g) * d, kp, vp, tp + b * M, len, bs, hkv, h, g, d, dv,
                         static_cast<float>(scale), op + (b * hq + h * g) * dv, lp + b * hq + h * g, qf, logits, acc,
                         kf);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& v_cache, const at::Tensor& block_table,
                                                          const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4 && block_table.dim() == 2 &&
                        seq_lens.dim() == 1,
                    "paged_decode_attention: expected q [B,Hq,D], caches [NB,bs,Hkv,D], block_table [B,M], "
                    "seq_lens [B]");
  TORCH_CHECK_VALUE(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
                    "paged_decode_attention: block_table and seq_lens must be int64 here");
  TORCH_CHECK_VALUE(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode_attention: cache dtypes differ");
  const at::Tensor qc = q.contiguous();
  const at::Tensor kc = k_cache.contiguous();
  const at::Tensor vc = v_cache.contiguous();
  const at::Tensor tbl = block_table.contiguous();
  const at::Tensor sl = seq_lens.contiguous();
  const int64_t B = qc.size(0), hq = qc.size(1), d = qc.size(2);
  const int64_t nb = kc.size(0), bs = kc.size(1), hkv = kc.size(2);
  const int64_t M = tbl.size(1);
  TORCH_CHECK_VALUE(kc.size(3) == d, "paged_decode_attention: head dims differ");
  TORCH_CHECK_VALUE(vc.size(0) == nb && vc.size(1) == bs && vc.size(2) == hkv, "paged_decode_attention: v_cache shape");
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "paged_decode_attention: Hq must be a multiple of Hkv");
  TORCH_CHECK_VALUE(tbl.size(0) == B && sl.size(0) == B, "paged_decode_attention: batch sizes differ");
  TORCH_CHECK_VALUE(bs > 0, "paged_decode_attention: block size must be positive");
  const int64_t* t = tbl.data_ptr<int64_t>();
  const int64_t* s = sl.data_ptr<int64_t>();
  check_rows_in_range(t, s, B, M, bs, nb, "paged_decode_attention");
  at::Tensor out = at::empty({B, hq, vc.size(3)}, qc.options());
  at::Tensor lse = at::empty({B, hq}, qc.options().dtype(at::kFloat));
  if (B == 0) return {out, lse};
  const auto kt = kc.scalar_type();
  const auto qt = qc.scalar_type();
  TORCH_CHECK_VALUE(qt == at::kFloat || qt == at::kHalf || qt == at::kBFloat16, "paged_decode_attention: q dtype");
#define UCM_ATTEND_Q(KTYPE)                                                           \
  if (qt == at::kFloat) attend_all<KTYPE, float>(qc, kc, vc, tbl, sl, scale, out, lse); \
  else if (qt == at::kHalf) attend_all<KTYPE, at::Half>(qc, kc, vc, tbl, sl, scale, out, lse); \
  else attend_all<KTYPE, at::BFloat16>(qc, kc, vc, tbl, sl, scale, out, lse);
  if (kt == at::kFloat) {
    UCM_ATTEND_Q(float)
  } else if (kt == at::kHalf) {
    UCM_ATTEND_Q(at::Half)
  } else if (kt == at::kBFloat16) {
    UCM_ATTEND_Q(at::BFloat16)
  } else {
    TORCH_CHECK_VALUE(false, "paged_decode_attention: cache dtype ", kt, " is not supported natively");
  }
#undef UCM_ATTEND_Q
  return {out, lse};
}

// Running per-block key sums (ESA/GSA/KVStar representations), in place: one call per layer and
// step instead of a dozen small torch ops. Fresh blocks (offset 0 written) are zeroed before any
// key of the call is added, as the reference does.
// Narrow group sums (bfloat16, float16, float8 e4m3): each group the call touches takes the call's
// keys summed in float32 (in token order), added to its widened value and rounded once to
// nearest even, float8 saturated at +-448 first: the contract's rule, bit for bit as torch does it.
template <typename ST>
void add_rounded_once(ST* s, const float* kp, const int64_t* sp, int64_t t_len, int64_t block_size, int64_t merge,
                      int64_t r, int64_t hd) {
  std::vector<int64_t> rows;  // touched groups, in first-touch order
  std::unordered_map<int64_t, int64_t> index;  // group -> its place in rows
  std::vector<int64_t> slot_of(static_cast<size_t>(t_len), -1);
  for (int64_t t = 0; t < t_len; ++t) {
    if (sp[t] < 0) continue;
    const int64_t row = (sp[t] / block_size) * r + (sp[t] % block_size) / merge;
    const auto found = index.emplace(row, static_cast<int64_t>(rows.size()));
    if (found.second) rows.push_back(row);
    slot_of[t] = found.first->second;
  }
  std::vector<float> acc(rows.size() * hd, 0.0f);
  for (int64_t t = 0; t < t_len; ++t) {
    if (slot_of[t] < 0) continue;
    float* dst = acc.data() + slot_of[t] * hd;
    const float* src = kp + t * hd;
    for (int64_t i = 0; i < hd; ++i) dst[i] += src[i];
  }
  const bool fp8 = std::is_same<ST, at::Float8_e4m3fn>::value;
  const float fmax = fp8 ? 448.0f : 0.0f;
  for (size_t i = 0; i < rows.size(); ++i) {
    ST* dst = s + rows[i] * hd;
    const float* add = acc.data() + i * hd;
    for (int64_t j = 0; j < hd; ++j) {
      float v = static_cast<float>(dst[j]) + add[j];
      if (fp8 && !std::isnan(v)) v = std::min(std::max(v, -fmax), fmax);
      dst[j] = static_cast<ST>(v);
    }
  }
}

void block_sums_add(at::Tensor sums, std::optional<at::Tensor> abs_sums, const at::Tensor& key,
                    const at::Tensor& slot_mapping, int64_t block_size, int64_t merge) {
  const auto st = sums.scalar_type();
  TORCH_CHECK_VALUE(sums.dim() == 4 && sums.is_contiguous() && sums.device().is_cpu() &&
                        (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kFloat8_e4m3fn),
                    "block_sums_add: sums must be a contiguous float32, bfloat16, float16 or float8_e4m3fn CPU "
                    "tensor [NB, R, H, D]");
  const int64_t nb = sums.size(0), r = sums.size(1), hd = sums.size(2) * sums.size(3);
  TORCH_CHECK_VALUE(block_size > 0 && merge > 0 && block_size % merge == 0 && block_size / merge == r,
                    "block_sums_add: block_size ", block_size, " / merge ", merge, " must equal R = ", r);
  TORCH_CHECK_VALUE(key.dim() == 3 && key.size(1) * key.size(2) == hd && slot_mapping.dim() == 1 &&
                        slot_mapping.size(0) == key.size(0),
                    "block_sums_add: key must be [T, H, D] matching sums and slot_mapping [T]");
  float* a = nullptr;
  if (abs_sums.has_value()) {
    const auto& t = *abs_sums;
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == nb * hd && t.device().is_cpu(),
                      "block_sums_add: abs_sums must be a contiguous float32 CPU tensor [NB, H, D]");
    a = t.data_ptr<float>();
  }
  const at::Tensor k = key.to(at::kFloat).contiguous();
  const at::Tensor sl = slot_mapping.to(at::kLong).contiguous();
  const float* kp = k.data_ptr<float>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t t_len = k.size(0);
  for (int64_t t = 0; t < t_len; ++t) {
    TORCH_CHECK_VALUE(sp[t] < nb * block_size, "block_sums_add: slot ", sp[t], " is past ", nb, " blocks of ", block_size);
  }
  uint8_t* raw = static_cast<uint8_t*>(sums.data_ptr());
  const int64_t esize = sums.element_size();
  for (int64_t t = 0; t < t_len; ++t) {
    if (sp[t] < 0 || sp[t] % block_size != 0) continue;
    const int64_t b = sp[t] / block_size;
    std::memset(raw + b * r * hd * esize, 0, static_cast<size_t>(esize * r * hd));  // zero bits: 0.0 in every type
    if (a != nullptr) std::memset(a + b * hd, 0, sizeof(float) * hd);
  }
  if (st == at::kFloat) {
    float* s = sums.data_ptr<float>();
    for (int64_t t = 0; t < t_len; ++t) {
      if (sp[t] < 0) continue;
      const int64_t b = sp[t] / block_size, off = sp[t] % block_size;
      float* dst = s + (b * r + off / merge) * hd;
      const float* src = kp + t * hd;
      for (int64_t i = 0; i < hd; ++i) dst[i] += src[i];
    }
  } else if (st == at::kBFloat16) {
    add_rounded_once(sums.data_ptr<at::BFloat16>(), kp, sp, t_len, block_size, merge, r, hd);
  } else if (st == at::kHalf) {
    add_rounded_once(sums.data_ptr<at::Half>(), kp, sp, t_len, block_size, merge, r, hd);
  } else {
    add_rounded_once(sums.data_ptr<at::Float8_e4m3fn>(), kp, sp, t_len, block_size, merge, r, hd);
  }
  if (a != nullptr) {
    for (int64_t t = 0; t < t_len; ++t) {
      if (sp[t] < 0) continue;
      float* ad = a + (sp[t] / block_size) * hd;
      const float* src = kp + t * hd;
      for (int64_t i = 0; i < hd; ++i) ad[i] += std::fabs(src[i]);
    }
  }
}

// Quest's running per-block element-wise min / max of K, in place. Blocks whose offset 0 is
// written restart (+inf / -inf) before any key of the call is folded in, as the reference does.
// Parallel over slices of the Hkv * D channels: each thread folds every token into its own
// slice, so there are no races and the result does not depend on the thread count. NaN keys
// propagate (a NaN is taken, and a NaN is never replaced), as torch's amin / amax.
constexpr int64_t kMinMaxSlice = 64;  // floats per work item: 256 bytes, whole cache lines

void block_minmax_update(at::Tensor mins, at::Tensor maxs, const at::Tensor& key, const at::Tensor& slot_mapping,
                         int64_t block_size) {
  TORCH_CHECK_VALUE(mins.dim() == 3 && mins.scalar_type() == at::kFloat && mins.is_contiguous() &&
                        mins.device().is_cpu(),
                    "block_minmax_update: mins must be a contiguous float32 CPU tensor [NB, H, D]");
  TORCH_CHECK_VALUE(maxs.sizes() == mins.sizes() && maxs.scalar_type() == at::kFloat && maxs.is_contiguous() &&
                        maxs.device().is_cpu(),
                    "block_minmax_update: maxs must be a contiguous float32 CPU tensor shaped like mins");
  TORCH_CHECK_VALUE(block_size > 0, "block_minmax_update: block_size must be positive");
  const int64_t nb = mins.size(0), hd = mins.size(1) * mins.size(2);
  TORCH_CHECK_VALUE(key.dim() == 3 && key.size(1) == mins.size(1) && key.size(2) == mins.size(2) &&
                        slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0),
                    "block_minmax_update: key must be [T, H, D] matching mins and slot_mapping [T]");
  const at::Tensor k = key.to(at::kFloat).contiguous();
  const at::Tensor sl = slot_mapping.to(at::kLong).contiguous();
  const float* kp = k.data_ptr<float>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t t_len = k.size(0);
  float* lo = mins.data_ptr<float>();
  float* hi = maxs.data_ptr<float>();
  for (int64_t t = 0; t < t_len; ++t) {
    TORCH_CHECK_VALUE(sp[t] < nb * block_size, "block_minmax_update: slot ", sp[t], " is past ", nb, " blocks of ",
                      block_size);
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < t_len; ++t) {
    if (sp[t] < 0 || sp[t] % block_size != 0) continue;
    const int64_t b = sp[t] / block_size;
    std::fill(lo + b * hd, lo + (b + 1) * hd, inf);
    std::fill(hi + b * hd, hi + (b + 1) * hd, -inf);
  }
  if (t_len == 0 || hd == 0) return;
  const int64_t slices = (hd + kMinMaxSlice - 1) / kMinMaxSlice;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (t_len * hd > 65536 && slices > 1)
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t c0 = s * kMinMaxSlice;
    const int64_t c1 = std::min<int64_t>(c0 + kMinMaxSlice, hd);
    for (int64_t t = 0; t < t_len; ++t) {
      if (sp[t] < 0) continue;
      const int64_t b = sp[t] / block_size;
      float* l = lo + b * hd;
      float* h = hi + b * hd;
      const float* x = kp + t * hd;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const float v = x[c];
        const bool nan = v != v;
        l[c] = (v < l[c] || nan) ? v : l[c];
        h[c] = (v > h[c] || nan) ? v : h[c];
      }
    }
  }
}

// sum over channels of max(q * lo, q * hi): the largest q . k any key inside the box [lo, hi]
// could reach.
inline float minmax_bound(const float* q, const float* lo, const float* hi, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) {
    const float a = q[c] * lo[c];
    const float b = q[c] * hi[c];
    s += a > b ? a : b;
  }
  return s;
}

// Quest block scores. group_reduce: kGroupMean over the GQA group or kGroupMax; summed over KV heads.
// OpenMP over (row, block) pairs, -inf past a row's blocks.
at::Tensor block_scores_minmax(const at::Tensor& q, const at::Tensor& mins, const at::Tensor& maxs,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t block_size,
                               int64_t group_reduce) {
  TORCH_CHECK_VALUE(maxs.scalar_type() == mins.scalar_type() && maxs.sizes() == mins.sizes(),
                    "block_scores_minmax: mins and maxs must have one dtype and shape");
  const BlockScoreArgs a =
      check_block_score_args("block_scores_minmax", q, mins, block_table, seq_lens, block_size, group_reduce);
  const at::Tensor& qc = a.q;
  const at::Tensor lc = mins.contiguous();
  const at::Tensor hc = maxs.contiguous();
  const int64_t B = a.B, hq = a.hq, d = a.d, hkv = a.hkv, M = a.M, g = a.g;
  at::Tensor out = at::empty({B, M}, qc.options().dtype(at::kFloat));
  if (B == 0 || M == 0) return out;
  const int64_t* t = a.table.data_ptr<int64_t>();
  const int64_t* s = a.lens.data_ptr<int64_t>();
  const float* qp = qc.data_ptr<float>();
  const float* lp = lc.data_ptr<float>();
  const float* hp = hc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();
  const float gf = static_cast<float>(g);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (B * M * hq * d > 32768)
  for (int64_t item = 0; item < B * M; ++item) {
    int64_t b, j;
    if (!row_block(item, M, s, block_size, o, b, j)) continue;
    const int64_t blk = std::max<int64_t>(t[item], 0);  // the reference clamps negative ids to 0
    float total = 0.0f;
    for (int64_t h = 0; h < hkv; ++h) {
      const float* l = lp + (blk * hkv + h) * d;
      const float* u = hp + (blk * hkv + h) * d;
      float acc = group_reduce == kGroupMean ? 0.0f : ninf;
      for (int64_t gi = 0; gi < g; ++gi) {
        const float v = minmax_bound(qp + (b * hq + h * g + gi) * d, l, u, d);
        if (group_reduce == kGroupMean) {
          acc += v;
        } else if (v > acc || std::isnan(v)) {
          acc = v;  // NaN propagates, as in torch's amax
        }
      }
      total += group_reduce == kGroupMean ? acc / gf : acc;
    }
    o[item] = total;
  }
  return out;
}

// Build facts the Python side reports (which instruction sets the kernels were compiled for).
std::string build_info() {
  std::string s;
#if defined(__AVX2__)
  s += "avx2 ";
#endif
#if defined(__POPCNT__)
  s += "popcnt ";
#endif
#ifdef _OPENMP
  s += "openmp ";
#endif
  return s.empty() ? std::string("portable") : s.substr(0, s.size() - 1);
}

}  // namespace

TORCH_LIBRARY(ucm_cpu, m) {
  m.def("sign_bits_pack(Tensor x) -> Tensor", &sign_bits_pack);
  m.def(
      "hamming_block_scores(Tensor q_codes, Tensor k_codes, Tensor block_table, Tensor seq_lens, int reduce) "
      "-> Tensor",
      &hamming_block_scores);
  m.def(
      "hamming_cosine_block_scores(Tensor q_codes, Tensor q_norms, Tensor k_codes, Tensor k_norms, Tensor block_table, "
      "Tensor seq_lens, int reduce) -> Tensor",
      &hamming_cosine_block_scores);
  m.def("block_topk(Tensor scores, Tensor k, Tensor must_keep, Tensor n_blocks) -> (Tensor, Tensor)", &block_topk);
  m.def(
      "select_rewrite(Tensor scores, Tensor k, Tensor must_keep, Tensor n_units, Tensor block_table, Tensor seq_lens, "
      "Tensor n_blocks, int unit_blocks, int block_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      &select_rewrite);
  m.def(
      "block_scores_dot(Tensor q, Tensor repr_cache, Tensor block_table, Tensor seq_lens, int block_size, "
      "int group_reduce) -> Tensor",
      &block_scores_dot);
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "float scale) -> (Tensor, Tensor)",
      &paged_decode_attention);
  m.def(
      "kvstar_scores(Tensor q, Tensor sums, Tensor abs_sums, Tensor block_table, Tensor n_full, int kept_dims, "
      "float scale) -> Tensor",
      &kvstar_scores);
  m.def(
      "block_sums_add(Tensor(a!) sums, Tensor(b!)? abs_sums, Tensor key, Tensor slot_mapping, int block_size, "
      "int merge) -> ()",
      &block_sums_add);
  m.def(
      "block_minmax_update(Tensor(a!) mins, Tensor(b!) maxs, Tensor key, Tensor slot_mapping, int block_size) -> ()",
      &block_minmax_update);
  m.def(
      "block_scores_minmax(Tensor q, Tensor mins, Tensor maxs, Tensor block_table, Tensor seq_lens, int block_size, "
      "int group_reduce) -> Tensor",
      &block_scores_minmax);
  m.def("build_info() -> str", &build_info);
  m.def("reduce_codes() -> int[]", &reduce_codes);
  m.def("group_reduce_codes() -> int[]", &group_reduce_codes);
  m.def("set_thread_cap(int cap) -> ()", &set_thread_cap);
  m.def("thread_budget() -> int", &thread_budget);
}
