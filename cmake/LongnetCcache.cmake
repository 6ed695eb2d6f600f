# ccache as the compiler launcher. PCH hits need the sloppiness below (ccache 4.7 has no key=value launcher syntax,
# so the settings travel through the environment of each compile).
find_program(LONGNET_CCACHE ccache)
if(LONGNET_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  # CCACHE_BASEDIR: paths inside the source tree are hashed relative to it, so clones in other folders (CI) hit too.
  set(_launcher ${CMAKE_COMMAND} -E env
      "CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime"
      "CCACHE_BASEDIR=${PROJECT_SOURCE_DIR}" ${LONGNET_CCACHE})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_launcher})
  message(STATUS "ccache: ${LONGNET_CCACHE}")
endif()
