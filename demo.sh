#!/usr/bin/env bash
# The main job on a fresh clone: sets up .venv and builds duo_fast when they are
# missing (tools/setup_env.sh, as CI does), then runs `duo-fast demo`: train a
# small Duo model with the curriculum, distill it (DCD), sample it in 1-64 steps
# and measure the samples exactly under the built-in dataset's true law.
#
#   bash demo.sh                 # the default run (under 10 minutes on 2 cores, after the build)
#   bash demo.sh --quick         # a smoke run (under 2 minutes)
#   bash demo.sh --help          # every option
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup_env.sh install requirements-test.txt
bash tools/setup_env.sh build --if-needed
exec .venv/bin/python -m duo_fast demo "$@"
