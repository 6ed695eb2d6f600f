# The SentencePiece tokenizer: training, encoding, special tokens, errors; and `longnet tokenizer` end to end.
# Media build only, like the tokenizer itself.
if(LONGNET_MEDIA)
  longnet_add_test_suite(text_tests
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_tokenizer.cpp
    DEPS longnet_text longnet_core
    LABELS cpu)

  add_test(NAME cli.tokenizer
    COMMAND bash ${PROJECT_SOURCE_DIR}/tests/apps/test_tokenizer_cli.sh $<TARGET_FILE:longnet>)
  set_tests_properties(cli.tokenizer PROPERTIES LABELS cpu)
endif()
