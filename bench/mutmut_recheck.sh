#!/usr/bin/env bash
# Reruns each survivor of a kept bench/mutmut_subset.sh copy against the whole test selection.
#
# mutmut runs a mutant only against the tests it saw call the mutated function. A function that
# runs inside a module-scoped fixture (tests/test_erase_wiring.py's `wired` erase run) is seen
# only by the first test that sets the fixture up. So a mutant there survives when a later test,
# which checks the fixture's results, would have failed it. This script runs every test file of the
# selection with the mutant switched on (mutmut's MUTANT_UNDER_TEST) and prints each verdict.
#
#   bench/mutmut_subset.sh -k DIR PRESET ...; bench/mutmut_recheck.sh DIR [TESTFILE...]
# TESTFILEs (default: the preset's whole selection) narrow the rerun, e.g. to the file holding the
# module-scoped fixture. PYTHON overrides the interpreter (default .venv/bin/python); JOBS the
# number of survivors rerun at once (default 2); SURVIVORS a file of `NAME: survived` lines (this
# script's own output) to recheck instead of mutmut's list, e.g. against other test files.
set -euo pipefail
{
dir=$(cd "$1" && pwd)
shift
python="${PYTHON:-$(git rev-parse --show-toplevel)/.venv/bin/python}"
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
cd "$dir"
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
    read -r -a tests <<< "$("$python" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]))')"
fi
export OMP_NUM_THREADS=1 RECARE_TEST_MODELS="$dir/.test-cache/models"
export python TESTS="${tests[*]}"
run_tests() {  # $TESTS is split on spaces: test paths hold none
    # shellcheck disable=SC2086
    (cd mutants && MUTANT_UNDER_TEST="$1" timeout 900 nice -n 15 "$python" -m pytest -x -q -p no:cacheprovider \
        $TESTS > /dev/null 2>&1)
}
if ! run_tests ""; then  # no mutant: the selection must pass, or every verdict below would read "killed"
    echo "the tests fail in $dir/mutants without a mutant; rerun there with pytest to see why" >&2
    exit 1
fi
recheck() {
    if run_tests "$1"; then echo "$1: survived"; else echo "$1: killed"; fi
}
export -f run_tests recheck
if [ -n "${SURVIVORS:-}" ]; then cat "$SURVIVORS"; else "$python" -m mutmut results; fi |
    awk -F': ' '$2 == "survived" {gsub(/ /, "", $1); print $1}' |
    xargs -P "${JOBS:-2}" -I{} bash -c 'recheck "$1"' _ {}
exit
}
