# longnet_text: the SentencePiece tokenizer (Debian's libsentencepiece-dev). No torch here.
# Part of the media build (LONGNET_MEDIA): GPU machines, which read prepared shards only, have no SentencePiece.
if(LONGNET_MEDIA)
  find_library(LONGNET_SENTENCEPIECE_LIBRARY sentencepiece REQUIRED)
  find_library(LONGNET_SENTENCEPIECE_TRAIN_LIBRARY sentencepiece_train REQUIRED)
  find_path(LONGNET_SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h REQUIRED)

  longnet_add_library(longnet_text
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/tokenizer.cpp
    DEPS longnet_core
    PRIVATE_DEPS ${LONGNET_SENTENCEPIECE_TRAIN_LIBRARY} ${LONGNET_SENTENCEPIECE_LIBRARY})
  target_include_directories(longnet_text PRIVATE ${LONGNET_SENTENCEPIECE_INCLUDE_DIR})
endif()
