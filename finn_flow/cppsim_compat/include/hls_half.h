// Minimal IEEE 754 binary16 `half` for C++ simulation without Vitis HLS (brevitas-a2q).
// Storage is a uint16_t so the type is trivially copyable (finn-hlslib type-puns it through
// unions); arithmetic goes through float. Conversions round to nearest, ties to even.
#ifndef A2Q_COMPAT_HLS_HALF_H
#define A2Q_COMPAT_HLS_HALF_H

#include <cstdint>
#include <cstring>

class half {
  std::uint16_t bits_;

  static std::uint16_t from_float(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // inf or nan
      return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    }
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow
    if (abs < 0x38800000u) {  // subnormal half (or zero)
      if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);
      const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
      const int shift = 126 - static_cast<int>(abs >> 23);  // 14..24
      std::uint32_t h = mant >> shift;
      const std::uint32_t rem = mant & ((1u << shift) - 1u);
      const std::uint32_t halfway = 1u << (shift - 1);
      if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
      return static_cast<std::uint16_t>(sign | h);
    }
    std::uint32_t h = ((abs - 0x38000000u) >> 13);
    const std::uint32_t rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }

  static float to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    std::uint32_t x;
    if (exp == 0x1fu) {
      x = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
      if (mant == 0) {
        x = sign;
      } else {  // normalize a subnormal
        exp = 113;
        while (!(mant & 0x400u)) { mant <<= 1; --exp; }
        x = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
      }
    } else {
      x = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &x, sizeof f);
    return f;
  }

 public:
  half() = default;
  half(float f) : bits_(from_float(f)) {}  // NOLINT: implicit like Vitis's
  half(double d) : bits_(from_float(static_cast<float>(d))) {}  // NOLINT
  half(int i) : bits_(from_float(static_cast<float>(i))) {}  // NOLINT
  operator float() const { return to_float(bits_); }
  half &operator+=(half o) { return *this = half(float(*this) + float(o)); }
  half &operator-=(half o) { return *this = half(float(*this) - float(o)); }
  half &operator*=(half o) { return *this = half(float(*this) * float(o)); }
  half &operator/=(half o) { return *this = half(float(*this) / float(o)); }
};

#endif
