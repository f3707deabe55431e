#!/usr/bin/env bash
# Install a duo_fast wheel into a fresh, throw-away venv and run the CPU smoke test
# (tests/smoke_installed.py) against it, outside the source tree; then its console
# script's `duo-fast bench --tiny` for one op (the files it writes are checked).
#
#   tools/smoke_wheel.sh WHEEL [smoke_installed.py options, e.g. --expect-cuda 0]
#
# The fresh venv gets no second torch: a .pth file puts the site-packages of
# $PYTHON (default: .venv/bin/python of this repository) after its own, so torch,
# tqdm and the reference's dependencies come from there, while duo_fast comes from
# the wheel (an editable duo_fast in $PYTHON's venv is not seen: .pth files of a
# directory added that way are not processed).
set -euo pipefail
if [[ $# -lt 1 || ! -f $1 ]]; then
  echo "usage: $0 WHEEL [smoke_installed.py options]" >&2
  exit 2
fi
wheel=$(realpath "$1")
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv --without-pip "$tmp/venv"
base_site=$("$python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "$base_site" > "$site/duo_fast_smoke_base.pth"
"$python" -m pip --python "$tmp/venv/bin/python" install --quiet --disable-pip-version-check \
  --no-deps --no-index "$wheel"

# -I: neither the current directory nor the script's nor PYTHONPATH is on sys.path.
cd "$tmp"
"$tmp/venv/bin/python" -I "$repo/tests/smoke_installed.py" --installed-under "$site" "$@"

# The console script from the wheel: `duo-fast bench` at --tiny sizes for one op, outside
# the source tree (no Duo code in sight unless $DUO_REFERENCE_DIR: the eager copy runs).
env -u PYTHONPATH "$tmp/venv/bin/duo-fast" bench --tiny --ops sample_zt --out "$tmp/bench" > "$tmp/bench.log" 2>&1 \
  || { cat "$tmp/bench.log"; echo "duo-fast bench failed" >&2; exit 1; }
for f in report.md results.csv results.json; do
  [[ -s $tmp/bench/$f ]] || { cat "$tmp/bench.log"; echo "duo-fast bench wrote no $f" >&2; exit 1; }
done
if "$tmp/venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  [[ -s $tmp/bench/time.png && -s $tmp/bench/memory.png ]] || { echo "duo-fast bench drew no plots" >&2; exit 1; }
fi
grep -q '^| sample_zt' "$tmp/bench/report.md" || { echo "no sample_zt row in duo-fast bench's table" >&2; exit 1; }
echo "duo-fast bench (installed): $(grep -c '^| sample_zt' "$tmp/bench/report.md") rows, reference code:" \
  "$(sed -n 's/.*| \(Duo code\|eager copy\) |.*/\1/p' "$tmp/bench/report.md" | sort -u | tr '\n' ' ')"
