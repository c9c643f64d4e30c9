# CMake toolchain file: llama.cpp for Windows x86-64, cross-compiled on Linux with Debian's MinGW-w64
# (scripts/windows_toolchain.sh). The posix thread model, because the default (win32) GCC has no std::thread.
set(CMAKE_SYSTEM_NAME Windows)
# Without it ggml does not know the target is x86 and builds none of its CPU variants.
set(CMAKE_SYSTEM_PROCESSOR x86_64)
set(CMAKE_C_COMPILER x86_64-w64-mingw32-gcc-posix)
set(CMAKE_CXX_COMPILER x86_64-w64-mingw32-g++-posix)
set(CMAKE_RC_COMPILER x86_64-w64-mingw32-windres)
# ggml loads its backends as ggml-<name>.dll; MinGW's default prefix would name them libggml-<name>.dll.
set(CMAKE_SHARED_MODULE_PREFIX "")
set(CMAKE_FIND_ROOT_PATH /usr/x86_64-w64-mingw32)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
