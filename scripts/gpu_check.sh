#!/usr/bin/env bash
# Run every gpu-marked test and every benchmark suite on a GPU machine.
# Usage: scripts/gpu_check.sh OUT_DIR [suite ...]   (default: all suites)
# Needs only torch + Triton: works from a plain checkout (PYTHONPATH=src), offline, nothing installed.
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [suite ...]}
shift
suites=${*:-all}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
python3 -m catkit.cli info 2>&1 | tee "$out/info.log"
python3 -m pytest -q -m gpu tests -rs -s 2>&1 | tee "$out/gpu_tests.log" || status=1
# shellcheck disable=SC2086
python3 -m catkit.cli bench $suites --out "$out" 2>&1 | tee "$out/bench.log" || status=1
echo "gpu_check: tests and benchmarks done (exit $status); results in $out"
exit $status
