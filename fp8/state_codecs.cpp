#include "fp8/state_codecs.h"

#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "common/test_hooks.h"
#include "fp8/block_quant.h"
#include "fp8/low_precision_tensor.h"

namespace fmoe::fp8 {
namespace codecs {

namespace {

BlockQuantOptions state_tiles(int64_t block) {
  BlockQuantOptions o;
  o.block_rows = 1;
  o.block_cols = block;
  return o;
}

// 16 uniform random bits per element of a tensor of n elements: a 32-bit
// integer hash of (index + seed), in int64 arithmetic that never overflows
// (products below 2^59). int64, on options' device.
at::Tensor hash_bits16(int64_t n, uint32_t seed, const at::TensorOptions& options) {
  constexpr int64_t kMask = 0xFFFFFFFFLL, kMul = 0x45d9f3b;
  at::Tensor x = at::arange(n, options.dtype(at::kLong)).add_(static_cast<int64_t>(seed)).bitwise_and_(kMask);
  for (int round = 0; round < 2; ++round) x = x.bitwise_xor(x.bitwise_right_shift(16)).mul_(kMul).bitwise_and_(kMask);
  return x.bitwise_xor(x.bitwise_right_shift(16)).bitwise_and_(0xFFFF);
}

constexpr double kFp4Max = 6.0;
constexpr double kE4m3Max = 448.0;

// E2M1's magnitude of each 3-bit code (bit 3 is the sign), as FP32 arithmetic
// on the codes (no table to copy to the device): codes 0 and 1 are 0 and 0.5
// (subnormal), code c >= 2 is 2^(c / 2 - 1) x (1 + (c mod 2) / 2): 1, 1.5, 2, 3, 4, 6.
at::Tensor fp4_magnitude(const at::Tensor& code) {
  const at::Tensor c = code.to(at::kFloat);
  const at::Tensor normal = at::exp2(at::floor(c * 0.5) - 1.0) * (1.0 + 0.5 * c.remainder(2.0));
  return at::where(c < 2.0, c * 0.5, normal);
}

// The largest code whose magnitude is at most a (a in [0, 6]).
at::Tensor fp4_code_below(const at::Tensor& a) {
  const at::Tensor e = at::floor(at::log2(a.clamp_min(1.0)));  // 0, 1, 2 from 1 on
  const at::Tensor m = at::floor((a / at::exp2(e) - 1.0) * 2.0).clamp(0.0, 1.0);
  at::Tensor code = at::where(a < 1.0, at::floor(a * 2.0), 2.0 + 2.0 * e + m).clamp(0.0, 7.0);
  // log2 rounds up just below a power of two: one code lower where that overshot.
  code = at::where(fp4_magnitude(code) > a, code - 1.0, code);
  return code.to(at::kLong);
}

std::atomic<bool> codec_tensor_ops_on_cpu{false};

// CPU tensors take the fused pass unless a test asks for the composition or the
// FMOE_FUSED_CPU_KERNELS=0 hook turns every fused CPU kernel off.
bool fused_on_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && !codec_tensor_ops_on_cpu.load() && common::test_hooks().fused_cpu_kernels;
}

// hash_bits16's value for one index: its arithmetic modulo 2^32 is uint32's.
inline uint32_t hash16(int64_t index, uint32_t seed) {
  uint32_t x = static_cast<uint32_t>(index) + seed;
  for (int round = 0; round < 2; ++round) x = (x ^ (x >> 16)) * 0x45d9f3bu;
  return (x ^ (x >> 16)) & 0xFFFFu;
}

}  // namespace

// diag(signs) x H16 / 4, H16 the Sylvester Hadamard matrix ((i, j) entry
// (-1)^popcount(i & j)): orthogonal, its inverse its transpose; row i's sign bit
// 0 of hash_bits16 at i. Built on options' device from index arithmetic: nothing
// is copied from the host.
at::Tensor random_hadamard16(uint32_t seed, const at::TensorOptions& options) {
  const at::Tensor i = at::arange(kNvfp4Block, options.dtype(at::kLong));
  at::Tensor parity = i.unsqueeze(1).bitwise_and(i.unsqueeze(0));  // 4-bit values: fold bits 2, 3 onto 0, 1, then 1 onto 0
  parity = parity.bitwise_xor(parity.bitwise_right_shift(2));
  parity = parity.bitwise_xor(parity.bitwise_right_shift(1)).bitwise_and(1);
  const at::Tensor row_sign = hash_bits16(kNvfp4Block, seed, options).bitwise_and(1).unsqueeze(1);
  return 0.25 - 0.5 * parity.bitwise_xor(row_sign).to(at::kFloat);
}

namespace {

constexpr float kE2m1[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};

// fp4_codes for a CPU tensor: the composition's FP32 arithmetic, in its order,
// without branches on the values, a tile at a time (parallel over tiles), then
// packed two codes a byte; the two agree bit for bit.
at::Tensor fp4_codes_cpu(const at::Tensor& flat, const at::Tensor& scales, int64_t block, std::optional<uint32_t> seed) {
  const at::Tensor x = flat.contiguous(), s = scales.contiguous();
  const int64_t n = x.numel(), bytes = (n + 1) / 2, tiles = s.numel();
  std::vector<uint8_t> codes(static_cast<size_t>(2 * bytes), 0);
  const float* xp = x.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const bool stochastic = seed.has_value();
  const uint32_t seed_value = seed.value_or(0);
  at::parallel_for(0, tiles, std::max<int64_t>(1, 16384 / block), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float divisor = sp[t] > 0.0f ? sp[t] : 1.0f;
      for (int64_t i = t * block; i < std::min(n, (t + 1) * block); ++i) {
        const float a = std::min(std::fabs(xp[i]) / divisor, static_cast<float>(kFp4Max));
        const uint32_t lo = static_cast<uint32_t>(a >= 0.5f) + static_cast<uint32_t>(a >= 1.0f) + static_cast<uint32_t>(a >= 1.5f) +
                            static_cast<uint32_t>(a >= 2.0f) + static_cast<uint32_t>(a >= 3.0f) + static_cast<uint32_t>(a >= 4.0f) +
                            static_cast<uint32_t>(a >= 6.0f);
        const float below = kE2m1[lo], step = kE2m1[lo < 7 ? lo + 1 : 7] - below;
        const float frac = step > 0.0f ? (a - below) / std::max(step, 1e-30f) : 0.0f;
        const bool up = stochastic ? static_cast<float>(hash16(i, seed_value)) / 65536.0f < frac
                                   : (frac > 0.5f) | ((frac == 0.5f) & ((lo & 1u) == 1u));
        const uint32_t magnitude = lo + static_cast<uint32_t>(up);
        codes[static_cast<size_t>(i)] = static_cast<uint8_t>(magnitude | (static_cast<uint32_t>((xp[i] < 0.0f) & (magnitude > 0)) << 3));
      }
    }
  });
  at::Tensor packed = at::empty({bytes}, x.options().dtype(at::kByte));
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, bytes, 65536, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) out[b] = static_cast<uint8_t>(codes[static_cast<size_t>(2 * b)] | (codes[static_cast<size_t>(2 * b + 1)] << 4));
  });
  return packed;
}

// decode_fp4 for a CPU tensor, a tile at a time.
at::Tensor decode_fp4_cpu(const at::Tensor& packed, const at::Tensor& scales, int64_t n, int64_t block) {
  const at::Tensor p = packed.contiguous(), s = scales.to(at::kFloat).contiguous();
  at::Tensor value = at::empty({n}, s.options());
  const uint8_t* in = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* out = value.data_ptr<float>();
  at::parallel_for(0, (n + block - 1) / block, std::max<int64_t>(1, 32768 / block), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float scale = sp[t];
      for (int64_t i = t * block; i < std::min(n, (t + 1) * block); ++i) {
        const uint32_t code = (in[i >> 1] >> ((i & 1) << 2)) & 15u;
        const float magnitude = kE2m1[code & 7u];
        out[i] = ((code & 8u) != 0 ? -magnitude : magnitude) * scale;
      }
    }
  });
  return value;
}

}  // namespace

// flat zero-padded to whole 1 x block tiles: [tiles, block].
at::Tensor as_tiles(const at::Tensor& flat, int64_t block) {
  const int64_t n = flat.numel(), tiles = (n + block - 1) / block;
  return (tiles * block == n ? flat : at::constant_pad_nd(flat, {0, tiles * block - n}, 0.0)).view({tiles, block});
}

namespace {

// flat (FP32, n elements) over per-tile scales (FP32, one per 1 x block tile,
// each at least the tile's max-abs / 6; 0 for a tile of zeros) -> packed E2M1
// codes (uint8, ceil(n / 2), low nibble first). Each magnitude over its scale
// rounds to a neighbouring E2M1 value: to nearest (ties to the even code), or
// up with the probability of its distance from the lower one when a seed is
// given (the noise, uniform in [0, 1), hash_bits16 of the element's index / 2^16).
// CPU tensors take one fused pass (fp4_codes_cpu), others this composition.
at::Tensor fp4_codes(const at::Tensor& flat, const at::Tensor& scales, int64_t block, std::optional<uint32_t> seed) {
  if (fused_on_cpu(flat)) return fp4_codes_cpu(flat, scales, block, seed);
  const int64_t n = flat.numel();
  const at::Tensor divisor = at::where(scales > 0, scales, at::ones_like(scales));
  const at::Tensor a = (as_tiles(flat, block).abs() / divisor.unsqueeze(1)).clamp_max_(kFp4Max).reshape({-1}).narrow(0, 0, n);
  const at::Tensor lo = fp4_code_below(a);
  const at::Tensor hi = (lo + 1).clamp_max_(7);
  const at::Tensor below = fp4_magnitude(lo), step = fp4_magnitude(hi) - below;
  const at::Tensor frac = at::where(step > 0, (a - below) / step.clamp_min(1e-30), at::zeros_like(a));
  const at::Tensor up = seed ? hash_bits16(n, *seed, flat.options()).to(at::kFloat).div_(65536.0) < frac
                            : at::logical_or(frac > 0.5, at::logical_and(frac == 0.5, lo.remainder(2) == 1));
  const at::Tensor magnitude = lo + up.to(at::kLong);
  const at::Tensor sign = at::logical_and(flat < 0, magnitude > 0).to(at::kLong);  // zero is always +0
  at::Tensor codes = magnitude.bitwise_or(sign.bitwise_left_shift(3));
  if (n % 2 == 1) codes = at::constant_pad_nd(codes, {0, 1}, 0);
  const at::Tensor pairs = codes.view({-1, 2});
  return pairs.select(1, 0).bitwise_or(pairs.select(1, 1).bitwise_left_shift(4)).to(at::kByte).contiguous();
}

// Each 1 x block tile's max-abs (FP32, one per tile; padding counts as zero).
at::Tensor tile_amax(const at::Tensor& flat, int64_t block) { return as_tiles(flat, block).abs().amax(1); }

}  // namespace

// fp4: {packed codes, FP32 scales = each 1 x block tile's max-abs / 6 (1 for a tile of zeros)}.
std::pair<at::Tensor, at::Tensor> encode_fp4(const at::Tensor& flat, int64_t block, std::optional<uint32_t> seed) {
  const at::Tensor amax = tile_amax(flat, block);
  const at::Tensor scales = at::where(amax > 0, amax / kFp4Max, at::ones_like(amax)).contiguous();
  return {fp4_codes(flat, scales, block, seed), scales};
}

// nvfp4: the tensor's FP32 scale g = max-abs / (6 x 448) puts the largest tile
// scale at E4M3's largest value; each 1 x 16 tile's scale, max-abs / (6 g), is
// stored in E4M3 rounded up to the next E4M3 value (so no magnitude exceeds 6
// and none saturates). {packed codes, E4M3 tile scales as uint8, g (FP32, one)}.
std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_nvfp4(const at::Tensor& flat, std::optional<uint32_t> seed) {
  const at::Tensor amax = tile_amax(flat, kNvfp4Block);
  const at::Tensor tensor_amax = amax.amax();
  const at::Tensor g = at::where(tensor_amax > 0, tensor_amax / (kFp4Max * kE4m3Max), at::ones_like(tensor_amax));
  const at::Tensor wanted = (amax / (g * kFp4Max)).clamp_max_(kE4m3Max);
  at::Tensor codes = wanted.to(at::kFloat8_e4m3fn).view(at::kByte);
  // Round to nearest went below the wanted scale: one code up (positive E4M3 codes order as their values).
  codes = at::where(codes.view(at::kFloat8_e4m3fn).to(at::kFloat) < wanted, codes + 1, codes).to(at::kByte).contiguous();
  const at::Tensor scales = codes.view(at::kFloat8_e4m3fn).to(at::kFloat) * g;
  return {fp4_codes(flat, scales, kNvfp4Block, seed), codes, g.reshape({1}).contiguous()};
}

namespace {

// fp6: E2M3 (sign, 2 exponent bits, 3 mantissa bits: magnitudes 0 to 7.5, the
// subnormals 0.125 apart below 1) in 1 x 32 tiles with a power-of-two scale
// per tile stored as an E8M0 byte (exponent + 127; 255, NaN, for a tile with a
// NaN or an infinity, whose codes are stored as zeros), as MXFP6 holds values.
// The scale is the smallest power of two 2^e with max-abs / 2^e <= 7.5, so
// nothing saturates. Rounded to nearest (ties to even) by a cast: E2M3's grid is
// E4M3's scaled by 2^6 below E4M3's 2^-6 (the same 3 mantissa bits, the same
// subnormal step), so an E4M3 cast of value x 2^-e x 2^-6 rounds to E2M3, and
// its byte's low 5 bits and sign are the 6-bit code. Four codes pack into 3
// bytes (low code in the low bits): 0.75 + 1 / 32 bytes a value. The scale
// and the scaling are exact powers of two (frexp, not log2; multiplications,
// never a division by 2^(e + 6), which overflows FP32 for e >= 122).
constexpr double kFp6Max = 7.5;

// 2^e as an FP32 value, exactly (e in [-149, 127]).
inline float pow2f(int e) { return std::ldexp(1.0f, e); }

// E2M3's value of a 6-bit code (bit 5 the sign): codes 0 to 7 are 0 to 0.875 by
// 0.125 (subnormal), code c >= 8 is 2^(c / 8 - 1) x (1 + (c mod 8) / 8).
constexpr float e2m3_value(uint32_t code) {
  const uint32_t c = code & 0x1Fu;
  const float magnitude = c < 8 ? 0.125f * static_cast<float>(c) : static_cast<float>(1u << (c / 8 - 1)) * (1.0f + 0.125f * static_cast<float>(c % 8));
  return (code & 0x20u) != 0 ? -magnitude : magnitude;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// FP32 bits b with the mantissa rounded to 3 bits (to nearest, ties to even),
// shifted down to sign, exponent and those 3 bits: E2M3's and E4M3's normals.
inline uint32_t round_mantissa_to_3_bits(uint32_t b) { return (b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20; }

// The 6-bit E2M3 code of x x 2^-e rounded to nearest, ties to even, where
// |x| x 2^-e <= 7.5 (down = 2^-e): what the E4M3 cast of x x 2^-e x 2^-6 gives
// the composition, without branches on the value. Below 1 the grid is the
// subnormals' 0.125 step: r x 8 rounded to an integer by adding 2^23; from 1 on
// it is FP32's own exponent with the mantissa rounded to 3 bits.
inline uint32_t e2m3_code(float x, float down) {
  const float r = std::fabs(x) * down;
  const uint32_t subnormal = float_bits(r * 8.0f + 8388608.0f) - 0x4B000000u;  // 0 to 8 (8 is 1.0: code 8)
  const uint32_t b = float_bits(r);
  const uint32_t rounded = round_mantissa_to_3_bits(b);  // sign 0
  const uint32_t normal = ((((rounded >> 3) - 127u + 1u) << 3) | (rounded & 7u)) & 0x1Fu;
  const uint32_t below_one = 0u - static_cast<uint32_t>(r < 1.0f);  // a mask, not a branch: the values' order is random
  return (subnormal & below_one) | (normal & ~below_one) | ((float_bits(x) >> 31) << 5);
}

// encode_fp6 for a CPU tensor: one pass over each tile (its max-abs, its
// exponent, its codes straight into the packed bytes), parallel over tiles.
// It stores the composition's bits.
std::pair<at::Tensor, at::Tensor> encode_fp6_cpu(const at::Tensor& flat) {
  const at::Tensor x = flat.contiguous();
  const int64_t n = x.numel(), tiles = (n + kFp6Block - 1) / kFp6Block;
  at::Tensor packed = at::empty({tiles * kFp6Block * 3 / 4}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({tiles}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  uint8_t* sp = scales.data_ptr<uint8_t>();
  at::parallel_for(0, tiles, 512, [&](int64_t begin, int64_t end) {
    float tile[kFp6Block];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kFp6Block, count = std::min(kFp6Block, n - first);
      float amax = 0.0f;
      uint32_t nonfinite = 0;
      for (int64_t i = 0; i < kFp6Block; ++i) {
        tile[i] = i < count ? xp[first + i] : 0.0f;
        nonfinite |= static_cast<uint32_t>((float_bits(tile[i]) & 0x7F800000u) == 0x7F800000u);
        amax = std::max(amax, std::fabs(tile[i]));
      }
      uint8_t* bytes = out + t * kFp6Block * 3 / 4;
      if (nonfinite != 0) {
        sp[t] = 255;
        std::fill(bytes, bytes + kFp6Block * 3 / 4, uint8_t{0});
        continue;
      }
      int exponent = 0;
      if (amax > 0.0f) {
        int k = 0;
        const float m = std::frexp(amax / static_cast<float>(kFp6Max), &k);
        exponent = std::max(-126, m == 0.5f ? k - 1 : k);
        if (amax / pow2f(exponent) > static_cast<float>(kFp6Max)) ++exponent;
      }
      sp[t] = static_cast<uint8_t>(exponent + 127);
      const float down = pow2f(-exponent);
      uint32_t codes[kFp6Block];
      for (int64_t i = 0; i < kFp6Block; ++i) codes[i] = e2m3_code(tile[i], down);
      for (int64_t q = 0; q < kFp6Block / 4; ++q) {
        const uint32_t word = codes[4 * q] | (codes[4 * q + 1] << 6) | (codes[4 * q + 2] << 12) | (codes[4 * q + 3] << 18);
        bytes[3 * q] = static_cast<uint8_t>(word);
        bytes[3 * q + 1] = static_cast<uint8_t>(word >> 8);
        bytes[3 * q + 2] = static_cast<uint8_t>(word >> 16);
      }
    }
  });
  return {packed, scales};
}

// decode_fp6 for a CPU tensor, a tile at a time: a table of the 64 signed values, times the tile's scale.
at::Tensor decode_fp6_cpu(const at::Tensor& packed, const at::Tensor& scales, int64_t n) {
  const at::Tensor p = packed.contiguous(), s = scales.contiguous();
  at::Tensor value = at::empty({n}, p.options().dtype(at::kFloat));
  const uint8_t* in = p.data_ptr<uint8_t>();
  const uint8_t* sp = s.data_ptr<uint8_t>();
  float* out = value.data_ptr<float>();
  at::parallel_for(0, (n + kFp6Block - 1) / kFp6Block, 512, [&](int64_t begin, int64_t end) {
    float table[64];
    for (uint32_t c = 0; c < 64; ++c) table[c] = e2m3_value(c);
    float tile[kFp6Block];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kFp6Block, count = std::min(kFp6Block, n - first);
      const float scale = sp[t] == 255 ? std::numeric_limits<float>::quiet_NaN() : pow2f(static_cast<int>(sp[t]) - 127);
      const uint8_t* bytes = in + t * kFp6Block * 3 / 4;
      for (int64_t q = 0; q < kFp6Block / 4; ++q) {
        const uint32_t word = bytes[3 * q] | (static_cast<uint32_t>(bytes[3 * q + 1]) << 8) | (static_cast<uint32_t>(bytes[3 * q + 2]) << 16);
        for (int64_t j = 0; j < 4; ++j) tile[4 * q + j] = table[(word >> (6 * j)) & 0x3Fu] * scale;
      }
      std::copy(tile, tile + count, out + first);
    }
  });
  return value;
}

// The E4M3 byte of v clamped to +-448 (NaN stays NaN, 0x7F with v's sign), rounded to
// nearest, ties to even, as the composition's clamp and cast give it, without
// branches on the value: below 2^-6 the subnormals' 2^-9 step (v x 2^9 rounded to
// an integer by adding 2^23), from 2^-6 on FP32's exponent, rebiased from 127 to
// 7, with the mantissa rounded to 3 bits.
inline uint8_t e4m3_code_saturated(float v) {
  const uint32_t sign = (float_bits(v) >> 24) & 0x80u;
  const float a = std::min(std::fabs(v), static_cast<float>(kE4m3Max));  // a NaN stays NaN
  const uint32_t subnormal = float_bits(a * 512.0f + 8388608.0f) - 0x4B000000u;
  const uint32_t b = float_bits(a);
  const uint32_t normal = round_mantissa_to_3_bits(b) - (120u << 3);
  const uint32_t below = 0u - static_cast<uint32_t>(a < 0.015625f), nan = 0u - static_cast<uint32_t>(a != a);
  return static_cast<uint8_t>((((subnormal & below) | (normal & ~below)) & ~nan) | (0x7Fu & nan) | sign);
}

// The E4M3 byte of v clamped to +-448, rounded stochastically with 16 bits of
// noise (0 to 65535): up to the next E4M3 value with the probability of v's
// distance from the one below, in steps of 2^-16 of the gap. From 2^-6 on the
// noise fills FP32's 20 bits below E4M3's 3 mantissa bits before they are cut
// (a carry is the round up; 448 has those bits zero, so nothing passes it);
// below it v x 2^9 plus noise / 2^16 is cut to an integer, the subnormal code
// (8 is 2^-6, the first normal). NaN stays NaN (0x7F with v's sign).
inline uint8_t e4m3_code_stochastic(float v, uint32_t noise) {
  const uint32_t sign = (float_bits(v) >> 24) & 0x80u;
  const float a = std::min(std::fabs(v), static_cast<float>(kE4m3Max));  // a NaN stays NaN
  const uint32_t nan = 0u - static_cast<uint32_t>(a != a);
  const float finite = a == a ? a : 0.0f;  // no NaN reaches the integer conversion
  const uint32_t subnormal = static_cast<uint32_t>(finite * 512.0f + static_cast<float>(noise) * (1.0f / 65536.0f));
  const uint32_t normal = ((float_bits(finite) + (noise << 4)) >> 20) - (120u << 3);
  const uint32_t below = 0u - static_cast<uint32_t>(finite < 0.015625f);
  return static_cast<uint8_t>((((subnormal & below) | (normal & ~below)) & ~nan) | (0x7Fu & nan) | sign);
}

// FP8 state for a CPU tensor: quantize_blocks' 1 x block tiles of a flat
// tensor (E4M3, FP32 scale = max-abs / 448, 1 for a tile of zeros or one
// holding a NaN; saturated at 448) in one pass a tile, the same bits:
// {codes [n], scales [1, tiles]}. With a seed, rounded stochastically
// (e4m3_code_stochastic, element i's noise hash16(i, seed)), as encode_fp8_stochastic's
// composition rounds it.
std::pair<at::Tensor, at::Tensor> encode_fp8_cpu(const at::Tensor& flat, int64_t block, std::optional<uint32_t> seed) {
  const at::Tensor x = flat.contiguous();
  const int64_t n = x.numel(), tiles = (n + block - 1) / block;
  at::Tensor codes = at::empty({n}, x.options().dtype(at::kByte));
  at::Tensor scales = at::empty({1, tiles}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, tiles, std::max<int64_t>(1, 16384 / block), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * block, last = std::min(n, first + block);
      float amax = 0.0f;
      bool nan = false;
      for (int64_t i = first; i < last; ++i) {
        nan |= std::isnan(xp[i]);
        amax = std::max(amax, std::fabs(xp[i]));
      }
      const float scale = !nan && amax > 0.0f ? amax / static_cast<float>(kE4m3Max) : 1.0f;  // amax's NaN fails "> 0"
      sp[t] = scale;
      if (seed) {
        for (int64_t i = first; i < last; ++i) cp[i] = e4m3_code_stochastic(xp[i] / scale, hash16(i, *seed));
      } else {
        for (int64_t i = first; i < last; ++i) cp[i] = e4m3_code_saturated(xp[i] / scale);
      }
    }
  });
  return {codes, scales};
}

at::Tensor decode_fp8_cpu(const at::Tensor& codes, const at::Tensor& scales, int64_t block) {
  const at::Tensor c = codes.contiguous(), s = scales.contiguous();
  const int64_t n = c.numel(), tiles = (n + block - 1) / block;
  at::Tensor value = at::empty({n}, s.options());
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* out = value.data_ptr<float>();
  at::parallel_for(0, tiles, std::max<int64_t>(1, 32768 / block), [&](int64_t begin, int64_t end) {
    float table[256];
    for (int code = 0; code < 256; ++code) table[code] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(code), c10::Float8_e4m3fn::from_bits()));
    for (int64_t t = begin; t < end; ++t) {
      const float scale = sp[t];
      for (int64_t i = t * block; i < std::min(n, (t + 1) * block); ++i) out[i] = table[cp[i]] * scale;
    }
  });
  return value;
}

}  // namespace

// FP8 state rounded stochastically: CPU tensors take one fused pass
// (encode_fp8_cpu with the seed), others this composition of the same
// arithmetic: each value over its tile's scale (as quantize_blocks computes it)
// is moved onto E4M3's grid by e4m3_code_stochastic's rule, where the cast to
// E4M3 is exact. {codes [n], scales [1, tiles]}.
std::pair<at::Tensor, at::Tensor> encode_fp8_stochastic(const at::Tensor& flat, int64_t block, uint32_t seed) {
  if (fused_on_cpu(flat)) return encode_fp8_cpu(flat, block, seed);
  const int64_t n = flat.numel();
  const at::Tensor tiles = as_tiles(flat.contiguous(), block);
  const at::Tensor amax = tiles.abs().amax(1);
  const at::Tensor scale = at::where(amax > 0, amax / kE4m3Max, at::ones_like(amax));  // a NaN tile's amax fails "> 0": 1
  const at::Tensor scaled = (tiles / scale.unsqueeze(1)).reshape({-1}).narrow(0, 0, n).contiguous();
  const at::Tensor noise = hash_bits16(n, seed, flat.options());
  const at::Tensor a = scaled.abs().clamp_max(kE4m3Max);
  const at::Tensor finite = at::where(at::isnan(a), at::zeros_like(a), a);
  const at::Tensor normal =
      finite.view(at::kInt).to(at::kLong).add(noise.mul(16)).bitwise_right_shift(20).bitwise_left_shift(20).to(at::kInt).view(at::kFloat);
  const at::Tensor subnormal = at::floor(finite * 512.0 + noise.to(at::kFloat) * (1.0 / 65536.0)) * (1.0 / 512.0);
  at::Tensor value = at::where(finite < 0.015625, subnormal, normal);
  value = at::where(at::isnan(a), a, value);
  value = at::where(at::signbit(scaled), -value, value);
  return {value.to(at::kFloat8_e4m3fn).view(at::kByte).contiguous(), scale.reshape({1, -1}).contiguous()};
}

// CPU tensors take one fused pass (encode_fp6_cpu), others this composition.
std::pair<at::Tensor, at::Tensor> encode_fp6(const at::Tensor& flat) {
  if (fused_on_cpu(flat)) return encode_fp6_cpu(flat);
  const at::Tensor tiles = as_tiles(flat, kFp6Block);
  const at::Tensor amax = tiles.abs().amax(1);
  // ceil(log2(y)) exactly, y = max-abs / 7.5 = m 2^k with m in [0.5, 1): k, or k - 1 where y is 2^(k - 1).
  const auto [mantissa, k] = at::frexp(amax / kFp6Max);
  at::Tensor exponent = at::where(amax > 0, (k - (mantissa == 0.5).to(k.scalar_type())).to(at::kFloat), at::zeros_like(amax)).clamp_min_(-126.0);
  // max-abs / 7.5 rounds to 2^e just above it: one up where the tile would saturate.
  exponent = at::where(amax / at::exp2(exponent) > kFp6Max, exponent + 1.0, exponent);
  // A tile holding a NaN or an infinity gets E8M0's NaN (255) and zero codes: it loads as NaN, so non-finite gradients stay visible.
  const at::Tensor finite = at::isfinite(amax);
  exponent = at::where(finite, exponent, at::full_like(exponent, 128.0));
  const at::Tensor scaled = at::where(finite.unsqueeze(1), tiles * at::exp2(-exponent).unsqueeze(1) * (1.0 / 64.0), at::zeros_like(tiles));
  const at::Tensor bytes = scaled.to(at::kFloat8_e4m3fn).view(at::kByte).to(at::kInt);
  const at::Tensor codes = bytes.bitwise_and(0x1F).bitwise_or(bytes.bitwise_right_shift(7).bitwise_left_shift(5)).view({-1, 4});
  const at::Tensor word = codes.select(1, 0)
                              .bitwise_or(codes.select(1, 1).bitwise_left_shift(6))
                              .bitwise_or(codes.select(1, 2).bitwise_left_shift(12))
                              .bitwise_or(codes.select(1, 3).bitwise_left_shift(18));
  const at::Tensor packed = at::stack({word.bitwise_and(0xFF), word.bitwise_right_shift(8).bitwise_and(0xFF), word.bitwise_right_shift(16)}, 1);
  return {packed.to(at::kByte).reshape({-1}).contiguous(), (exponent + 127.0).to(at::kByte).contiguous()};
}

at::Tensor decode_fp6(const at::Tensor& packed, const at::Tensor& scales, int64_t n) {
  if (fused_on_cpu(packed)) return decode_fp6_cpu(packed, scales, n);
  const at::Tensor b = packed.to(at::kInt).view({-1, 3});
  const at::Tensor word = b.select(1, 0).bitwise_or(b.select(1, 1).bitwise_left_shift(8)).bitwise_or(b.select(1, 2).bitwise_left_shift(16));
  const at::Tensor codes = at::stack({word, word.bitwise_right_shift(6), word.bitwise_right_shift(12), word.bitwise_right_shift(18)}, 1)
                               .bitwise_and(0x3F);
  const at::Tensor e4m3 = codes.bitwise_and(0x1F).bitwise_or(codes.bitwise_right_shift(5).bitwise_left_shift(7)).to(at::kByte);
  const at::Tensor values = e4m3.view(at::kFloat8_e4m3fn).to(at::kFloat).mul_(64.0).view({-1, kFp6Block});  // E2M3's magnitudes, exactly
  const at::Tensor e8m0 = scales.to(at::kFloat);
  const at::Tensor scale = at::where(e8m0 == 255.0, at::full_like(e8m0, NAN), at::exp2(e8m0 - 127.0)).unsqueeze(1);
  return (values * scale).reshape({-1}).narrow(0, 0, n);
}

at::Tensor decode_fp4(const at::Tensor& packed, const at::Tensor& scales, int64_t n, int64_t block) {
  if (fused_on_cpu(packed)) return decode_fp4_cpu(packed, scales, n, block);
  const at::Tensor bytes = packed.to(at::kLong);
  const at::Tensor codes = at::stack({bytes.bitwise_and(15), bytes.bitwise_right_shift(4)}, 1).reshape({-1}).narrow(0, 0, n);
  const at::Tensor magnitude = fp4_magnitude(codes.bitwise_and(7));
  const at::Tensor value = at::where(codes.bitwise_right_shift(3) == 1, -magnitude, magnitude);
  return value * scales.repeat_interleave(block).narrow(0, 0, n);
}

std::pair<at::Tensor, at::Tensor> encode_fp8(const at::Tensor& flat, int64_t block) {
  if (fused_on_cpu(flat)) return encode_fp8_cpu(flat, block, std::nullopt);
  const BlockQuantized q = quantize_blocks(flat, state_tiles(block));
  return {q.codes, q.scales};
}

at::Tensor decode_fp8(const at::Tensor& codes, const at::Tensor& scales, int64_t block) {
  if (fused_on_cpu(codes)) return decode_fp8_cpu(codes, scales, block);
  return dequantize_blocks(BlockQuantized{codes, scales, state_tiles(block)});
}

at::Tensor stochastic_round_bf16(const at::Tensor& value, uint32_t seed) {
  const at::Tensor v = value.to(at::kFloat).contiguous();
  if (fused_on_cpu(v)) {
    // One pass: the composition's integer arithmetic modulo 2^32 (its int64 sum's low 32 bits), the
    // noise hash16 of the element's index; the BF16 is the rounded float's high half (NaNs as the cast makes them).
    at::Tensor out = at::empty(v.sizes(), v.options().dtype(at::kBFloat16));
    const uint32_t* in = reinterpret_cast<const uint32_t*>(v.data_ptr<float>());
    c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
    at::parallel_for(0, v.numel(), 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t rounded = (in[i] + hash16(i, seed)) & 0xFFFF0000u;
        float f;
        std::memcpy(&f, &rounded, sizeof f);
        op[i] = std::isnan(f) ? c10::BFloat16(f) : c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
      }
    });
    return out;
  }
  const at::Tensor noise = hash_bits16(v.numel(), seed, v.options());
  // Adding the noise below BF16's last bit, then truncating, rounds the magnitude
  // up with probability (its dropped bits) / 2^16; the sign bit is untouched.
  const at::Tensor bits = v.view(at::kInt).reshape({-1}).to(at::kLong);
  const at::Tensor rounded = bits.add(noise).bitwise_and_(~int64_t{0xFFFF}).to(at::kInt).view(at::kFloat);
  return rounded.view(v.sizes()).to(at::kBFloat16);  // exact: the low 16 bits are zero
}

}  // namespace codecs

void use_codec_tensor_ops_on_cpu(bool on) { codecs::codec_tensor_ops_on_cpu.store(on); }

}  // namespace fmoe::fp8
