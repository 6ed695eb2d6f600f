# media_tests: image, video, audio and log-mel decoding plus damaged media (no torch). Test media are made by the
# tests with the ffmpeg command line and OpenCV, into temporary folders.
if(LONGNET_MEDIA)
  longnet_add_test_suite(media_tests
    SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/test_image.cpp ${CMAKE_CURRENT_SOURCE_DIR}/test_video.cpp
            ${CMAKE_CURRENT_SOURCE_DIR}/test_audio.cpp ${CMAKE_CURRENT_SOURCE_DIR}/test_mel.cpp
            ${CMAKE_CURRENT_SOURCE_DIR}/test_bad_media.cpp
    DEPS longnet_media opencv_core opencv_imgproc opencv_imgcodecs
    LABELS cpu)

  # Writes the decoded 16 kHz samples and our log-mel of an audio file for tools/check_logmel.py.
  longnet_add_executable(logmel_dump
    SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/logmel_dump.cpp
    DEPS longnet_media)

  # Log-mel against librosa on an espeak-ng speech clip; skipped (exit 77) when librosa or espeak-ng is missing.
  # The project environment's python (tools/setup.sh passes it as Python3_EXECUTABLE and installs librosa there).
  find_package(Python3 REQUIRED COMPONENTS Interpreter)
  add_test(NAME media.logmel_vs_librosa
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/check_logmel.py --dump $<TARGET_FILE:logmel_dump>)
  set_tests_properties(media.logmel_vs_librosa PROPERTIES LABELS cpu SKIP_RETURN_CODE 77)
endif()
