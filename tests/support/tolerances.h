// Error bounds of the attention tests, per dtype, as the max relative error
//   max |actual - expected| / max |expected|      (over one tensor; see relative_error in oracle.h)
// against the float64 oracle (tests/support/oracle.h). One place, so that every suite judges a dtype alike.
#pragma once

#include <stdexcept>
#include <string>

#include <c10/core/ScalarType.h>

namespace longnet::test {

// float64: the reference and the oracle differ only in summation order (~1e-15 per op on these sizes).
// float32: unit roundoff 6e-8 grows with the O(N + D) terms of each sum; 1e-5 leaves margin for N, D ≤ 256.
// float16/bfloat16: a few units of the dtype's epsilon (2^-10 and 2^-7) on softmax-weighted averages.
inline double relative_tolerance(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Double: return 1e-10;
    case c10::ScalarType::Float: return 1e-5;
    case c10::ScalarType::Half: return 5e-3;
    case c10::ScalarType::BFloat16: return 4e-2;
    default: throw std::invalid_argument(std::string("no attention tolerance for dtype ") + c10::toString(dtype));
  }
}

// A low-precision kernel passes when its error against the float64 oracle is at most this factor times the error of
// the reference backend run in the same dtype (the rule of flash-attention's tests).
inline constexpr double kLowPrecisionErrorFactor = 2.0;

}  // namespace longnet::test
