#!/usr/bin/env bash
# The project's environment, from nothing: shared by .ci/run (CI) and demo.sh (the main job).
#
#   tools/setup_env.sh install [REQUIREMENTS_FILE ...]
#       create .venv when missing; install the pinned torch and the given requirements
#   tools/setup_env.sh build [--if-needed]
#       build duo_fast into .venv (editable install), with its CUDA part when nvcc is
#       found (DUO_FAST_CUDA overrides); --if-needed skips the build when duo_fast
#       imports and its compiled module is newer than every source of the build
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.14.1}  # a CUDA 13.0 build; pip finds it on this machine's disk

cmd=${1:?usage: tools/setup_env.sh install [REQUIREMENTS ...] | build [--if-needed]}
shift
case $cmd in
  install)
    if [[ ! -x .venv/bin/python ]]; then
      "$PYTHON" -m venv .venv
    fi
    reqs=()
    for r in "$@"; do reqs+=(-r "$r"); done
    .venv/bin/pip install --quiet --disable-pip-version-check "$TORCH_PIN" "${reqs[@]}"
    ;;
  build)
    if [[ ${1:-} == --if-needed ]] && .venv/bin/python - <<'PY' 2>/dev/null
import pathlib, sys
import duo_fast._C as c  # noqa: F401  (fails when not built)
so = pathlib.Path(c.__file__).stat().st_mtime
root = pathlib.Path(".")
sources = [*root.glob("csrc/**/*"), *root.glob("cmake/*"), root / "CMakeLists.txt", root / "setup.py"]
sys.exit(0 if all(p.stat().st_mtime <= so for p in sources if p.is_file()) else 1)
PY
    then
      echo "duo_fast is built and up to date"
      exit 0
    fi
    if [[ -z ${DUO_FAST_CUDA:-} ]]; then
      if command -v nvcc >/dev/null 2>&1 || [[ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]]; then
        export DUO_FAST_CUDA=1
      else
        export DUO_FAST_CUDA=0
      fi
    fi
    echo "building duo_fast (DUO_FAST_CUDA=$DUO_FAST_CUDA; a few minutes on 2 cores)"
    .venv/bin/pip install --quiet --disable-pip-version-check --no-build-isolation -e .
    .venv/bin/python -c "import duo_fast; print('build_info:', duo_fast.build_info())"
    ;;
  *)
    echo "tools/setup_env.sh: unknown command $cmd" >&2
    exit 2
    ;;
esac
