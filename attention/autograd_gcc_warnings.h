// Included first by the translation units that instantiate torch::autograd::Function::apply for CUDA work
// (flash_backend.cpp, fused_backend.cpp, positional.cpp). GCC 13 at -O3 reports false -Warray-bounds and
// -Wstringop-overflow inside libstdc++'s vector<bool>, inlined from apply (custom_function.h), and this family of
// middle-end warnings tends to come together. Diagnostic pragmas hold for the rest of the translation unit, so they
// must come before its other includes; there is deliberately no push/pop.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Warray-bounds"
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wstringop-overread"
#pragma GCC diagnostic ignored "-Wrestrict"
#endif
