# longnet_encoders: the modality encoders (token, image/video patch and log-mel patch embeddings with modality and
# positional embeddings), the first layer of the multimodal model in fusion/.
longnet_add_library(longnet_encoders TORCH
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/encoders.cpp
  DEPS longnet_core)
# The learned-position sum of encoders.cpp (kernels/ holds CUDA code only; the glue compiles without it).
if(LONGNET_CUDA)
  target_sources(longnet_encoders PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/kernels/position_sum.cu)
endif()
