# longnet_media: image (OpenCV), video and audio (FFmpeg) decoding, log-mel and patchify into plain structs.
# No torch: the fuzzers (fuzz/, built by tools/fuzz.sh) compile these sources without LibTorch.
if(LONGNET_MEDIA)
  longnet_add_library(longnet_media
    SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/image.cpp ${CMAKE_CURRENT_SOURCE_DIR}/video.cpp
            ${CMAKE_CURRENT_SOURCE_DIR}/audio.cpp ${CMAKE_CURRENT_SOURCE_DIR}/mel.cpp
            ${CMAKE_CURRENT_SOURCE_DIR}/patchify.cpp ${CMAKE_CURRENT_SOURCE_DIR}/ffmpeg_input.cpp
    DEPS longnet_core
    PRIVATE_DEPS opencv_core opencv_imgproc opencv_imgcodecs PkgConfig::FFMPEG)
endif()
