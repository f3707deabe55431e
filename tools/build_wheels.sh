#!/usr/bin/env bash
# Build duo_fast wheels for a matrix of torch versions x CUDA toolkits, each torch in
# its own venv, and smoke-test each wheel installed in a fresh venv.
#
#   tools/build_wheels.sh [options] TORCH:CUDA [TORCH:CUDA ...]
#
#   TORCH   a torch version as pip names it: 2.14.1, 2.13.0+cpu, ...
#   CUDA    cpu     no CUDA kernels (DUO_FAST_CUDA=0, no nvcc on PATH): +cputorchA.B
#           X.Y     the CUDA kernels, compiled by a CUDA X.Y toolkit: +cuXYtorchA.B. The
#                   toolkit is $CUDA_HOME, or nvcc on PATH, or /usr/local/cuda-X.Y, whichever
#                   is release X.Y; else it comes from PyPI into build/wheel-envs
#                   (CUDA 13 on: nvidia-cuda-nvcc, -runtime, -crt and nvidia-nvvm == X.Y.*,
#                   merged into one toolkit folder; PyPI's CUDA 12 nvcc wheels lack nvcc, so
#                   CUDA 12 needs an installed toolkit). torch must be a CUDA X.* build.
#
# Options:
#   --out DIR            where the wheels go (default: dist/)
#   --torch-index URL    pip --index-url for torch (e.g. https://download.pytorch.org/whl/cu128
#                        for a CUDA 12.8 build of torch); default: pip's configuration (PyPI)
#   --archs "8.0;9.0"    DUO_FAST_CUDA_ARCHS (default: CMakeLists.txt's)
#   --jobs N             DUO_FAST_BUILD_JOBS (default: the CPU count)
#   --no-smoke           skip tools/smoke_wheel.sh
#   --pypi-cuda          take the toolkit from PyPI even where one of release X.Y is installed
#   --base-python PY     an interpreter whose torch is reused when it is exactly TORCH (no
#                        second download): the build venv sees its site-packages through a
#                        .pth file (default: .venv/bin/python of this repository, if present)
#
# Examples:
#   tools/build_wheels.sh 2.14.1:cpu 2.14.1:13.0          # what CI builds
#   tools/build_wheels.sh 2.13.0+cpu:cpu                   # another torch, CPU only
#   tools/build_wheels.sh --torch-index https://download.pytorch.org/whl/cu128 2.8.0:12.8
#
# Venvs, toolkits and CMake build folders are kept under build/wheel-envs and build/
# (per torch version and variant), so a second run only rebuilds what changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

out=dist torch_index="" archs="" jobs=$(nproc) smoke=1 pypi_cuda=0
base_python=""
[[ -x .venv/bin/python ]] && base_python=$repo/.venv/bin/python
specs=()
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --torch-index) torch_index=$2; shift 2 ;;
    --archs) archs=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --no-smoke) smoke=0; shift ;;
    --pypi-cuda) pypi_cuda=1; shift ;;
    --base-python) base_python=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) specs+=("$1"); shift ;;
  esac
done
if ((${#specs[@]} == 0)); then
  echo "usage: $0 [options] TORCH:CUDA ... (e.g. 2.14.1:cpu 2.14.1:13.0); --help" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
envs=$repo/build/wheel-envs
mkdir -p "$envs"

py_version() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }
torch_of() { "$1" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }

# torch_env TORCH -> prints the python of a venv with that torch (created on first use)
torch_env() {
  local want=$1 venv=$envs/torch-$1 have
  if [[ ! -x $venv/bin/python ]]; then
    local base=${base_python:-python3}
    have=$(torch_of "$base")
    if [[ -n $have && ( $have == "$want" || ${have%%+*} == "$want" ) ]]; then
      # Reuse the base interpreter's torch (and pip, setuptools, ...): no second download.
      # No pip/setuptools of the venv's own, which would shadow the base's.
      "$base" -m venv --without-pip "$venv" >&2
      "$base" -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
        > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/duo_fast_base.pth"
      echo "$base" > "$venv/smoke-python"  # .pth chains are not followed: smoke-test with the base
      echo "torch $want: reusing $base's torch $have" >&2
    else
      echo "torch $want: installing into $venv" >&2
      "$base" -m venv "$venv" >&2
      "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip "setuptools>=64" wheel >&2
      "$venv/bin/pip" install --quiet --disable-pip-version-check ${torch_index:+--index-url "$torch_index"} \
        "torch==$want" >&2
      "$venv/bin/pip" install --quiet --disable-pip-version-check numpy scipy tqdm >&2
      command -v cmake >/dev/null || "$venv/bin/pip" install --quiet --disable-pip-version-check "cmake>=3.22" >&2
      echo "$venv/bin/python" > "$venv/smoke-python"
    fi
  fi
  echo "$venv/bin/python"
}

nvcc_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p'; }

# cuda_home X.Y PYTHON -> prints a toolkit root of release X.Y
cuda_home() {
  local want=$1 python=$2 c
  ((pypi_cuda)) || for c in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")")" "/usr/local/cuda-$want"; do
    if [[ -n $c && -x $c/bin/nvcc && $(nvcc_release "$c/bin/nvcc") == "$want" ]]; then echo "$c"; return; fi
  done
  # From PyPI: nvcc and the runtime (headers, libcudart) as wheels, copied into one folder
  # laid out like a toolkit (bin, include, lib64, nvvm): nvcc finds its includes beside
  # bin. CUDA 12 (and 11): nvidia-cuda-{nvcc,runtime}-cu12 (nvidia/cuda_nvcc, .../cuda_runtime);
  # CUDA 13 on: nvidia-cuda-{nvcc,runtime,crt} and nvidia-nvvm (all in nvidia/cu13).
  local major=${want%%.*} root=$envs/cuda-$want
  if [[ ! -x $root/bin/nvcc ]]; then
    local pkgs=$envs/cuda-$want-pkgs suffix="" extra=()
    if ((major <= 12)); then suffix=-cu$major; else extra=("nvidia-cuda-crt==$want.*" "nvidia-nvvm==$want.*"); fi
    echo "CUDA $want: nvidia-cuda-nvcc$suffix, nvidia-cuda-runtime$suffix ${extra[*]} $want.* from PyPI" >&2
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$pkgs" \
      "nvidia-cuda-nvcc$suffix==$want.*" "nvidia-cuda-runtime$suffix==$want.*" "${extra[@]}" >&2
    local nvcc_bin header
    nvcc_bin=$(find "$pkgs/nvidia" -path '*/bin/nvcc' -type f | head -1)
    header=$(find "$pkgs/nvidia" -path '*/include/cuda_runtime.h' -type f | head -1)
    if [[ -z $nvcc_bin ]]; then
      echo "PyPI's nvidia-cuda-nvcc$suffix $want has no nvcc binary (only ptxas: the CUDA 12 wheels are" \
           "trimmed for JIT use; CUDA 13's are complete). Install a CUDA $want toolkit (NVIDIA's installer" \
           "or repository, conda's cuda-nvcc + cuda-cudart-dev) and pass it as CUDA_HOME=/path/to/cuda-$want." >&2
      exit 1
    fi
    if [[ -z $header ]]; then echo "no include/cuda_runtime.h in the CUDA wheels in $pkgs" >&2; exit 1; fi
    rm -rf "$root"; mkdir -p "$root/lib64"
    cp -a "$(dirname "$(dirname "$nvcc_bin")")"/. "$root"/
    cp -a "$(dirname "$(dirname "$header")")"/. "$root"/
    if [[ -d $root/lib ]]; then cp -a "$root"/lib/. "$root"/lib64/; fi
    (cd "$root/lib64" && for so in libcudart.so.*; do [[ -e libcudart.so ]] || ln -s "$so" libcudart.so; done)
    chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
  fi
  [[ $(nvcc_release "$root/bin/nvcc") == "$want" ]] || { echo "$root/bin/nvcc is not CUDA $want" >&2; exit 1; }
  echo "$root"
}

# PATH without any folder that holds nvcc (the CPU variant must not see a toolkit)
no_nvcc_path() {
  local p="" dir
  IFS=: read -ra dirs <<< "$PATH"
  for dir in "${dirs[@]}"; do
    if [[ -n $dir && ! -x $dir/nvcc ]]; then p+="${p:+:}$dir"; fi
  done
  echo "$p"
}

built=()
for spec in "${specs[@]}"; do
  if [[ $spec != *:* ]]; then echo "bad spec $spec: TORCH:CUDA (e.g. 2.14.1:13.0 or 2.14.1:cpu)" >&2; exit 2; fi
  tv=${spec%%:*} cv=${spec#*:}
  echo "== duo_fast wheel for torch $tv, CUDA $cv"
  python=$(torch_env "$tv")
  stage=$(mktemp -d)
  start=$SECONDS
  if [[ $cv == cpu ]]; then
    env -u CUDA_HOME -u CUDA_PATH PATH="$(no_nvcc_path)" DUO_FAST_CUDA=0 DUO_FAST_BUILD_JOBS="$jobs" \
      "$python" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps -w "$stage" .
    expect=0
  else
    home=$(cuda_home "$cv" "$python")
    env CUDA_HOME="$home" PATH="$home/bin:$PATH" DUO_FAST_CUDA=1 DUO_FAST_BUILD_JOBS="$jobs" \
      ${archs:+DUO_FAST_CUDA_ARCHS="$archs"} \
      "$python" -m pip wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps -w "$stage" .
    expect=1
  fi
  wheel=$(ls "$stage"/duo_fast-*.whl)
  mv -f "$wheel" "$out/"
  wheel=$out/$(basename "$wheel")
  rm -rf "$stage"
  echo "built $wheel in $((SECONDS - start)) s"
  if ((smoke)); then
    PYTHON=$(cat "$(dirname "$(dirname "$python")")/smoke-python") bash tools/smoke_wheel.sh "$wheel" --expect-cuda "$expect"
  fi
  built+=("$wheel")
done
echo "== wheels:"
printf '%s\n' "${built[@]}"
