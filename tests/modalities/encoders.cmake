# The modality encoders (modalities/encoders.h), in float64 on CPU.
longnet_add_test_suite(encoders_tests TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_encoders.cpp
  DEPS longnet_encoders
  LABELS cpu)
# On a CUDA device (label gpu): the learned-position kernel against float64 on the CPU and the torch ops.
longnet_add_test_suite(encoders_gpu_tests TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_encoders_gpu.cpp ${PROJECT_SOURCE_DIR}/tests/support/oracle.cpp
  DEPS longnet_encoders
  LABELS gpu)
