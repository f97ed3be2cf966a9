// Minimal hls::vector<T, N> for C++ simulation without Vitis HLS (brevitas-a2q, finn_flow).
// Vitis's own header is proprietary; finn-hlslib and FINN's cppsim drivers only need a
// fixed-size array with element access, iteration, element-wise assignment and fill.
#ifndef A2Q_COMPAT_HLS_VECTOR_H
#define A2Q_COMPAT_HLS_VECTOR_H

#include <array>
#include <cstddef>
#include <initializer_list>

// Vitis provides `half` through its own headers; every FINN/finn-hlslib translation unit that
// uses it includes hls_vector.h first (via utils.hpp), so the open-source replacement lives here.
#include "hls_half.h"

namespace hls {

template <typename T, std::size_t N>
class vector {
  std::array<T, N> data_{};

 public:
  using value_type = T;
  vector() = default;
  vector(const T &fill) { data_.fill(fill); }  // NOLINT: implicit like Vitis's
  vector(std::initializer_list<T> init) {
    std::size_t i = 0;
    for (const T &x : init) {
      if (i < N) data_[i++] = x;
    }
  }
  static constexpr std::size_t size() { return N; }
  T &operator[](std::size_t i) { return data_[i]; }
  const T &operator[](std::size_t i) const { return data_[i]; }
  T *begin() { return data_.data(); }
  T *end() { return data_.data() + N; }
  const T *begin() const { return data_.data(); }
  const T *end() const { return data_.data() + N; }
  bool operator==(const vector &other) const { return data_ == other.data_; }
  bool operator!=(const vector &other) const { return data_ != other.data_; }
};

}  // namespace hls

#endif
