# The CUDA architecture list of duo_fast, included by CMakeLists.txt (which decides
# when it applies). Also runs on its own, for the tests:
#   cmake -DARCHS="9.0;8.0" -P cmake/DuoFastCudaArchs.cmake   # prints 90-real;80-real;90-virtual
#
# duo_fast_cuda_architectures(<spec> <source> <out_architectures> <out_list>)
#   <spec>: compute capabilities "8.0;9.0" or "8.0 9.0" (torch's TORCH_CUDA_ARCH_LIST
#   syntax; a "+PTX" suffix is accepted and ignored, PTX is always embedded for the
#   highest). An "a" suffix (9.0a, 10.0a) selects the architecture-specific target.
#   <source>: the variable the spec came from, named in error messages.
#   <out_architectures>: CMAKE_CUDA_ARCHITECTURES: SASS for each item ("80-real") and
#   PTX of the highest compute capability ("90-virtual"); when the highest is listed
#   both plain and with "a", the PTX is the plain one (portable to newer GPUs).
#   <out_list>: the items without "+PTX", in the given order, duplicates dropped.
# Architecture names (Ampere, Hopper), "sm_90", "90" and empty items are errors.
if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  cmake_minimum_required(VERSION 3.22)  # policies of the project, e.g. if(IN_LIST)
endif()

function(duo_fast_cuda_architectures spec source out_architectures out_list)
  string(STRIP "${spec}" _s)
  string(REGEX REPLACE "[ \t]*;[ \t]*" ";" _s "${_s}")   # "8.0; 9.0" -> "8.0;9.0"
  string(REGEX REPLACE "[ \t]+" ";" _s "${_s}")          # "8.0 9.0"  -> "8.0;9.0"
  if(_s STREQUAL "")
    message(FATAL_ERROR "${source} is empty: list compute capabilities such as 8.0;9.0")
  endif()
  if(_s MATCHES "(^;|;;|;$)")
    message(FATAL_ERROR "${source}=\"${spec}\" has an empty item: list compute capabilities "
                        "separated by single ';' or spaces, such as 8.0;9.0")
  endif()
  set(_list "")
  set(_architectures "")
  set(_highest "")      # e.g. "9.0" (compared as a version)
  set(_highest_ptx "")  # e.g. "90" or "90a"
  foreach(_item IN LISTS _s)
    if(NOT _item MATCHES "^([0-9]+)\\.([0-9])(a?)(\\+PTX)?$")
      message(FATAL_ERROR
        "${source}=\"${spec}\": \"${_item}\" is not a compute capability. List numbers "
        "major.minor such as 8.0;9.0 (optionally with the architecture-specific suffix, 9.0a); "
        "architecture names are not accepted (Ampere: 8.0 or 8.6, Ada: 8.9, Hopper: 9.0, "
        "Blackwell: 10.0 or 12.0).")
    endif()
    set(_cc "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
    set(_arch "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    if("${_cc}${CMAKE_MATCH_3}" IN_LIST _list)
      continue()
    endif()
    list(APPEND _list "${_cc}${CMAKE_MATCH_3}")
    list(APPEND _architectures "${_arch}-real")
    if(_highest STREQUAL "" OR _cc VERSION_GREATER _highest
       OR (_cc VERSION_EQUAL _highest AND CMAKE_MATCH_3 STREQUAL ""))
      set(_highest "${_cc}")
      set(_highest_ptx "${_arch}")
    endif()
  endforeach()
  list(APPEND _architectures "${_highest_ptx}-virtual")
  set(${out_architectures} "${_architectures}" PARENT_SCOPE)
  set(${out_list} "${_list}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  duo_fast_cuda_architectures("${ARCHS}" "ARCHS" _architectures _list)
  execute_process(COMMAND "${CMAKE_COMMAND}" -E echo "${_architectures}")
endif()
