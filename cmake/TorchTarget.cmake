# Builds an INTERFACE target `torch_ext` from the *running* torch (the one the
# extension will be loaded into).  find_package(Torch) is avoided on purpose:
# with CUDA wheels it demands a full toolkit even for CPU builds (BUILD-NOTES).
if(NOT Python_EXECUTABLE)
  find_package(Python 3.9 REQUIRED COMPONENTS Interpreter)
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import sys
try:
    import torch
    from torch.utils import cpp_extension as ce
except Exception as e:  # noqa: BLE001
    print("ERROR:" + repr(e)); sys.exit(0)
import os
print("OK")
print("|".join(ce.include_paths()))
print(os.path.join(os.path.dirname(torch.__file__), "lib"))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(int(torch.version.cuda is not None))
print(torch.__version__)
]=]
  OUTPUT_VARIABLE _torch_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_rc)
string(REGEX MATCHALL "[^\n]+" _torch_lines "${_torch_info}")
list(GET _torch_lines 0 _torch_status)
if(NOT _torch_status STREQUAL "OK")
  message(FATAL_ERROR
    "lowrank_ops: cannot import torch from ${Python_EXECUTABLE} (${_torch_status}).\n"
    "lowrank_ops must be built against the torch that will run it. Install torch first, then build without isolation:\n"
    "    pip install torch\n"
    "    pip install --no-build-isolation .\n")
endif()
list(GET _torch_lines 1 TORCH_INCLUDE_DIRS)
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}")
list(GET _torch_lines 2 TORCH_LIB_DIR)
list(GET _torch_lines 3 TORCH_CXX11_ABI)
list(GET _torch_lines 4 TORCH_HAS_CUDA)
list(GET _torch_lines 5 TORCH_VERSION_STRING)
message(STATUS "lowrank_ops: torch ${TORCH_VERSION_STRING} (cuda=${TORCH_HAS_CUDA}) at ${TORCH_LIB_DIR}")

add_library(torch_ext INTERFACE)
target_include_directories(torch_ext SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_compile_definitions(torch_ext INTERFACE
  _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI}
  TORCH_EXTENSION_NAME=_C
  TORCH_API_INCLUDE_EXTENSION_H)
target_link_directories(torch_ext INTERFACE "${TORCH_LIB_DIR}")
target_link_libraries(torch_ext INTERFACE c10 torch torch_cpu)
