# The modality encoders (modalities/encoders.h), in float64 on CPU.
longnet_add_test_suite(encoders_tests TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_encoders.cpp
  DEPS longnet_encoders
  LABELS cpu)
