// The kernels of moe/cpu_kernels.h for one instruction set: CMake compiles this
// file once per CPU_CAPABILITY (DEFAULT, AVX2, AVX512) with that set's flags, so
// at::vec::Vectorized<float> is 8 or 16 lanes of AVX2 / AVX-512, or the portable
// loop. Everything is computed in FP32 and rounded once on store.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "moe/cpu_kernels.h"

#ifndef CPU_CAPABILITY
#error "compile moe/cpu_kernels_isa.cpp with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

namespace fmoe::moe::cpu_isa {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<c10::BFloat16>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kBlock = 2 * kLanes;  // one block: two float vectors, one BF16 vector

// Rows per parallel task: about 32k elements of work, at least one row.
int64_t row_grain(int64_t row_elements) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elements)); }

// Loads n <= kBlock elements (the rest zero) as two float vectors.
inline void load(const float* p, int64_t n, Vec& a, Vec& b) {
  if (n >= kBlock) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kLanes);
  } else {
    a = Vec::loadu(p, static_cast<int>(std::min(n, kLanes)));
    b = n > kLanes ? Vec::loadu(p + kLanes, static_cast<int>(n - kLanes)) : Vec(0.0f);
  }
}
inline void load(const c10::BFloat16* p, int64_t n, Vec& a, Vec& b) {
  const BVec v = n >= kBlock ? BVec::loadu(p) : BVec::loadu(p, static_cast<int>(n));
  std::tie(a, b) = at::vec::convert_to_float<c10::BFloat16>(v);
}
inline void store(float* p, int64_t n, const Vec& a, const Vec& b) {
  if (n >= kBlock) {
    a.store(p);
    b.store(p + kLanes);
  } else {
    a.store(p, static_cast<int>(std::min(n, kLanes)));
    if (n > kLanes) b.store(p + kLanes, static_cast<int>(n - kLanes));
  }
}
inline void store(c10::BFloat16* p, int64_t n, const Vec& a, const Vec& b) {
  const BVec v = at::vec::convert_from_float<c10::BFloat16>(a, b);
  if (n >= kBlock) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}

inline Vec sigmoid(const Vec& x) {
  const Vec one(1.0f);
  return one / (one + x.neg().exp());
}

inline float horizontal_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

template <class T>
void swiglu_forward(const T* h, T* a, int64_t rows, int64_t ffn) {
  at::parallel_for(0, rows, row_grain(3 * ffn), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = h + r * 2 * ffn;
      const T* up = gate + ffn;
      T* out = a + r * ffn;
      for (int64_t j = 0; j < ffn; j += kBlock) {
        const int64_t n = std::min(kBlock, ffn - j);
        Vec g0, g1, u0, u1;
        load(gate + j, n, g0, g1);
        load(up + j, n, u0, u1);
        store(out + j, n, g0 * sigmoid(g0) * u0, g1 * sigmoid(g1) * u1);
      }
    }
  });
}

template <class T>
void swiglu_backward(const T* h, const T* da, T* dh, T* a, int64_t rows, int64_t ffn) {
  const Vec one(1.0f);
  at::parallel_for(0, rows, row_grain(6 * ffn), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = h + r * 2 * ffn;
      const T* up = gate + ffn;
      const T* grad = da + r * ffn;
      T* dgate = dh + r * 2 * ffn;
      T* dup = dgate + ffn;
      T* out = a ? a + r * ffn : nullptr;
      for (int64_t j = 0; j < ffn; j += kBlock) {
        const int64_t n = std::min(kBlock, ffn - j);
        Vec g[2], u[2], d[2];
        load(gate + j, n, g[0], g[1]);
        load(up + j, n, u[0], u[1]);
        load(grad + j, n, d[0], d[1]);
        Vec dg[2], du[2], act[2];
        for (int i = 0; i < 2; ++i) {
          const Vec s = sigmoid(g[i]);
          const Vec silu = g[i] * s;
          // silu'(g) = s (1 + g (1 - s))
          dg[i] = d[i] * u[i] * s * (one + g[i] * (one - s));
          du[i] = d[i] * silu;
          act[i] = silu * u[i];
        }
        store(dgate + j, n, dg[0], dg[1]);
        store(dup + j, n, du[0], du[1]);
        if (out) store(out + j, n, act[0], act[1]);
      }
    }
  });
}

template <class Delta, class Out>
void rms_norm_forward(const float* x, const Delta* delta, const float* w, float eps, float* sum, Out* y, float* r, int64_t rows,
                      int64_t dim) {
  at::parallel_for(0, rows, row_grain(3 * dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* xr = x + row * dim;
      const float* s = xr;
      if (delta) {  // s = x + delta, written once
        float* sr = sum + row * dim;
        for (int64_t j = 0; j < dim; j += kBlock) {
          const int64_t n = std::min(kBlock, dim - j);
          Vec a0, a1, b0, b1;
          load(xr + j, n, a0, a1);
          load(delta + row * dim + j, n, b0, b1);
          store(sr + j, n, a0 + b0, a1 + b1);
        }
        s = sr;
      }
      Vec acc(0.0f);
      for (int64_t j = 0; j < dim; j += kBlock) {
        Vec a0, a1;
        load(s + j, std::min(kBlock, dim - j), a0, a1);
        acc = at::vec::fmadd(a0, a0, acc);
        acc = at::vec::fmadd(a1, a1, acc);
      }
      const float rr = 1.0f / std::sqrt(horizontal_sum(acc) / static_cast<float>(dim) + eps);
      r[row] = rr;
      const Vec rv(rr);
      for (int64_t j = 0; j < dim; j += kBlock) {
        const int64_t n = std::min(kBlock, dim - j);
        Vec a0, a1, w0, w1;
        load(s + j, n, a0, a1);
        load(w + j, n, w0, w1);
        store(y + row * dim + j, n, a0 * rv * w0, a1 * rv * w1);
      }
    }
  });
}

// Rows per block of the weight gradient's partial sums: fixed, so that the sum
// does not depend on how many threads run.
constexpr int64_t kNormRowsPerBlock = 16;

template <class Grad>
void rms_norm_backward(const float* s, const float* w, const float* r, const Grad* g, const float* g_sum, float* dx, float* dw,
                       int64_t rows, int64_t dim) {
  const int64_t blocks = (rows + kNormRowsPerBlock - 1) / kNormRowsPerBlock;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(blocks, 1) * dim), 0.0f);
  const float inv_dim = 1.0f / static_cast<float>(dim);
  at::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(4 * dim * kNormRowsPerBlock)), [&](int64_t b0, int64_t b1) {
    for (int64_t block = b0; block < b1; ++block) {
      float* dw_part = partial.data() + block * dim;
      const int64_t row_end = std::min(rows, (block + 1) * kNormRowsPerBlock);
      for (int64_t row = block * kNormRowsPerBlock; row < row_end; ++row) {
        const float* sr = s + row * dim;
        const Grad* gr = g + row * dim;
        Vec acc(0.0f);
        for (int64_t j = 0; j < dim; j += kBlock) {
          const int64_t n = std::min(kBlock, dim - j);
          Vec s0, s1, g0, g1, w0, w1;
          load(sr + j, n, s0, s1);
          load(gr + j, n, g0, g1);
          load(w + j, n, w0, w1);
          acc = at::vec::fmadd(g0 * w0, s0, acc);
          acc = at::vec::fmadd(g1 * w1, s1, acc);
        }
        const float rr = r[row];
        const Vec rv(rr), coef(rr * rr * rr * horizontal_sum(acc) * inv_dim);
        for (int64_t j = 0; j < dim; j += kBlock) {
          const int64_t n = std::min(kBlock, dim - j);
          Vec s0, s1, g0, g1, w0, w1, p0, p1;
          load(sr + j, n, s0, s1);
          load(gr + j, n, g0, g1);
          load(w + j, n, w0, w1);
          Vec d0 = g0 * w0 * rv - s0 * coef, d1 = g1 * w1 * rv - s1 * coef;
          if (g_sum) {
            Vec e0, e1;
            load(g_sum + row * dim + j, n, e0, e1);
            d0 = d0 + e0;
            d1 = d1 + e1;
          }
          store(dx + row * dim + j, n, d0, d1);
          load(dw_part + j, n, p0, p1);
          store(dw_part + j, n, at::vec::fmadd(g0 * s0, rv, p0), at::vec::fmadd(g1 * s1, rv, p1));
        }
      }
    }
  });
  std::fill(dw, dw + dim, 0.0f);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t j = 0; j < dim; j += kBlock) {
      const int64_t n = std::min(kBlock, dim - j);
      Vec a0, a1, p0, p1;
      load(dw + j, n, a0, a1);
      load(partial.data() + block * dim + j, n, p0, p1);
      store(dw + j, n, a0 + p0, a1 + p1);
    }
  }
}

void route_select(const float* scores, const float* bias, int64_t tokens, int64_t experts, int64_t groups, int64_t group_top_k,
                  int64_t top_k, bool top2_groups, int64_t* experts_out) {
  const int64_t per_group = experts / groups;
  const bool grouped = group_top_k < groups;
  at::parallel_for(0, tokens, row_grain(4 * experts), [&](int64_t begin, int64_t end) {
    std::vector<float> selection(static_cast<size_t>(experts)), group_score(static_cast<size_t>(groups));
    std::vector<int64_t> order(static_cast<size_t>(std::max(experts, groups)));
    // Best first; equal values: the lower index first.
    const auto better = [](const std::vector<float>& v) {
      return [&v](int64_t a, int64_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
    };
    for (int64_t t = begin; t < end; ++t) {
      const float* row = scores + t * experts;
      for (int64_t e = 0; e < experts; ++e) selection[e] = row[e] + bias[e];
      if (grouped) {
        for (int64_t grp = 0; grp < groups; ++grp) {
          const float* v = selection.data() + grp * per_group;
          float best = -std::numeric_limits<float>::infinity(), second = best;
          for (int64_t i = 0; i < per_group; ++i) {
            if (v[i] > best) {
              second = best;
              best = v[i];
            } else if (v[i] > second) {
              second = v[i];
            }
          }
          group_score[grp] = top2_groups && per_group >= 2 ? best + second : best;
        }
        for (int64_t grp = 0; grp < groups; ++grp) order[grp] = grp;
        std::partial_sort(order.begin(), order.begin() + group_top_k, order.begin() + groups, better(group_score));
        std::vector<bool> kept(static_cast<size_t>(groups), false);
        for (int64_t i = 0; i < group_top_k; ++i) kept[order[i]] = true;
        for (int64_t e = 0; e < experts; ++e) {
          if (!kept[e / per_group]) selection[e] = -std::numeric_limits<float>::infinity();
        }
      }
      for (int64_t e = 0; e < experts; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + top_k, order.begin() + experts, better(selection));
      std::copy(order.begin(), order.begin() + top_k, experts_out + t * top_k);
    }
  });
}

// In a block of n < kBlock elements held as (a0, a1), the lanes from n on
// become fill0 / fill1's.
inline void keep_first(int64_t n, Vec& a0, Vec& a1, const Vec& fill0, const Vec& fill1) {
  const Vec lanes = Vec::arange(0.0f, 1.0f);
  const Vec count(static_cast<float>(n));
  a0 = Vec::blendv(fill0, a0, lanes < count);
  a1 = Vec::blendv(fill1, a1, (lanes + Vec(static_cast<float>(kLanes))) < count);
}

template <class T>
void cross_entropy_forward(const T* logits, const int64_t* targets, int64_t rows, int64_t vocab, float* lse, float* target_logit) {
  at::parallel_for(0, rows, row_grain(2 * vocab), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* x = logits + row * vocab;
      Vec m0(-std::numeric_limits<float>::infinity()), m1 = m0;
      for (int64_t j = 0; j < vocab; j += kBlock) {
        const int64_t n = std::min(kBlock, vocab - j);
        Vec a0, a1;
        load(x + j, n, a0, a1);
        if (n < kBlock) keep_first(n, a0, a1, m0, m1);  // the zero-filled tail must not raise the maximum
        m0 = at::vec::maximum(m0, a0);
        m1 = at::vec::maximum(m1, a1);
      }
      const float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, at::vec::maximum(m0, m1));
      const Vec mv(m);
      Vec s(0.0f);
      for (int64_t j = 0; j < vocab; j += kBlock) {
        const int64_t n = std::min(kBlock, vocab - j);
        Vec a0, a1;
        load(x + j, n, a0, a1);
        Vec e0 = (a0 - mv).exp(), e1 = (a1 - mv).exp();
        if (n < kBlock) keep_first(n, e0, e1, Vec(0.0f), Vec(0.0f));
        s = s + e0 + e1;
      }
      lse[row] = m + std::log(horizontal_sum(s));
      target_logit[row] = static_cast<float>(x[targets[row]]);
    }
  });
}

template <class T>
void cross_entropy_backward(const T* logits, const int64_t* targets, const float* lse, float scale, T* grad, int64_t rows, int64_t vocab) {
  at::parallel_for(0, rows, row_grain(2 * vocab), [&](int64_t begin, int64_t end) {
    const Vec sv(scale);
    for (int64_t row = begin; row < end; ++row) {
      const T* x = logits + row * vocab;
      T* g = grad + row * vocab;
      const Vec l(lse[row]);
      const int64_t target = targets[row];
      for (int64_t j = 0; j < vocab; j += kBlock) {
        const int64_t n = std::min(kBlock, vocab - j);
        Vec a0, a1;
        load(x + j, n, a0, a1);
        Vec p0 = (a0 - l).exp(), p1 = (a1 - l).exp();
        if (target >= j && target < j + n) {  // the one-hot term, in the block that holds it
          alignas(64) float block[kBlock];
          p0.store(block);
          p1.store(block + kLanes);
          block[target - j] -= 1.0f;
          p0 = Vec::loadu(block);
          p1 = Vec::loadu(block + kLanes);
        }
        store(g + j, n, p0 * sv, p1 * sv);
      }
    }
  });
}

// The table's entries: dtype flags to the typed kernels.
void swiglu_forward_entry(const void* h, void* a, int64_t rows, int64_t ffn, bool bf16) {
  if (bf16) {
    swiglu_forward(static_cast<const c10::BFloat16*>(h), static_cast<c10::BFloat16*>(a), rows, ffn);
  } else {
    swiglu_forward(static_cast<const float*>(h), static_cast<float*>(a), rows, ffn);
  }
}

void swiglu_backward_entry(const void* h, const void* da, void* dh, void* a, int64_t rows, int64_t ffn, bool bf16) {
  if (bf16) {
    using T = c10::BFloat16;
    swiglu_backward(static_cast<const T*>(h), static_cast<const T*>(da), static_cast<T*>(dh), static_cast<T*>(a), rows, ffn);
  } else {
    swiglu_backward(static_cast<const float*>(h), static_cast<const float*>(da), static_cast<float*>(dh), static_cast<float*>(a), rows,
                    ffn);
  }
}

void cross_entropy_forward_entry(const void* logits, bool bf16, const int64_t* targets, int64_t rows, int64_t vocab, float* lse,
                                 float* target_logit) {
  if (bf16) {
    cross_entropy_forward(static_cast<const c10::BFloat16*>(logits), targets, rows, vocab, lse, target_logit);
  } else {
    cross_entropy_forward(static_cast<const float*>(logits), targets, rows, vocab, lse, target_logit);
  }
}

void cross_entropy_backward_entry(const void* logits, bool bf16, const int64_t* targets, const float* lse, float scale, void* grad,
                                  int64_t rows, int64_t vocab) {
  if (bf16) {
    cross_entropy_backward(static_cast<const c10::BFloat16*>(logits), targets, lse, scale, static_cast<c10::BFloat16*>(grad), rows, vocab);
  } else {
    cross_entropy_backward(static_cast<const float*>(logits), targets, lse, scale, static_cast<float*>(grad), rows, vocab);
  }
}

template <class Delta>
void rms_norm_forward_out(const float* x, const Delta* delta, const float* w, float eps, float* sum, void* y, bool y_bf16, float* r,
                          int64_t rows, int64_t dim) {
  if (y_bf16) {
    rms_norm_forward(x, delta, w, eps, sum, static_cast<c10::BFloat16*>(y), r, rows, dim);
  } else {
    rms_norm_forward(x, delta, w, eps, sum, static_cast<float*>(y), r, rows, dim);
  }
}

void rms_norm_forward_entry(const float* x, const void* delta, bool delta_bf16, const float* w, float eps, float* sum, void* y,
                            bool y_bf16, float* r, int64_t rows, int64_t dim) {
  if (delta_bf16) {
    rms_norm_forward_out(x, static_cast<const c10::BFloat16*>(delta), w, eps, sum, y, y_bf16, r, rows, dim);
  } else {
    rms_norm_forward_out(x, static_cast<const float*>(delta), w, eps, sum, y, y_bf16, r, rows, dim);
  }
}

void rms_norm_backward_entry(const float* s, const float* w, const float* r, const void* g, bool g_bf16, const float* g_sum, float* dx,
                             float* dw, int64_t rows, int64_t dim) {
  if (g_bf16) {
    rms_norm_backward(s, w, r, static_cast<const c10::BFloat16*>(g), g_sum, dx, dw, rows, dim);
  } else {
    rms_norm_backward(s, w, r, static_cast<const float*>(g), g_sum, dx, dw, rows, dim);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY

#define FMOE_KERNELS_NAME2(a, b) a##b
#define FMOE_KERNELS_NAME(a, b) FMOE_KERNELS_NAME2(a, b)
#define FMOE_STRINGIFY2(x) #x
#define FMOE_STRINGIFY(x) FMOE_STRINGIFY2(x)

const CpuKernels& FMOE_KERNELS_NAME(kernels_, CPU_CAPABILITY)() {
  static const CpuKernels table{FMOE_STRINGIFY(CPU_CAPABILITY),
                                CPU_CAPABILITY::swiglu_forward_entry,
                                CPU_CAPABILITY::swiglu_backward_entry,
                                CPU_CAPABILITY::rms_norm_forward_entry,
                                CPU_CAPABILITY::rms_norm_backward_entry,
                                CPU_CAPABILITY::route_select,
                                CPU_CAPABILITY::cross_entropy_forward_entry,
                                CPU_CAPABILITY::cross_entropy_backward_entry};
  return table;
}

}  // namespace fmoe::moe::cpu_isa
