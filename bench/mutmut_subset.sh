#!/usr/bin/env bash
# Mutation testing of one part of recare against the fastest test files that cover it: minutes for
# the parts whose tests load no model (fsutil, guidance), hours for the training stages on 2 cores.
# pyproject.toml's [tool.mutmut] holds the whole configuration (`mutmut run`: many hours).
# Runs in a scratch copy of the committed tree (HEAD), so the working tree is never mutated.
#
#   bench/mutmut_subset.sh PRESET                        a named part (list below)
#   bench/mutmut_subset.sh -m GLOB... -t TESTFILE...     any modules against any test files
#   options: -k DIR   keep the scratch copy in DIR (rerun one mutant there: `mutmut run NAME`)
#            -j N     mutants tested at once (default 2)      -p PYTHON (default .venv/bin/python)
#            -n PATTERN  only the mutants whose names match (fnmatch; repeatable), e.g.
#                        -n '*encode_ids*': one function of a module too big to run whole
#
# Prints mutmut's verdict for every mutant, then the diff of every survivor.
set -euo pipefail
{  # read whole before running: bash reads a script as it goes, and an edit mid-run would run garbage

preset() {
    case "$1" in
        fsutil) mutate=(recare_cli/fsutil.py); tests=(tests/test_fsutil.py) ;;
        export-check) mutate=(recare_cli/export/check.py); tests=(tests/test_export_checks.py) ;;
        guidance) mutate=(recare_cli/erase/guidance.py); tests=(tests/test_guidance.py) ;;  # no model loads
        erase-pure)  # the partial denoising and the trained weights, on the tiny-random model
            mutate=(recare_cli/erase/denoise.py recare_cli/erase/params.py); tests=(tests/test_erase_method.py) ;;
        erase-request)  # the request, its run hash and the recipe file: no model trained
            mutate=(recare_cli/erase/request.py recare_cli/erase/recipe.py)
            tests=(tests/test_erase_request.py tests/test_recipe_plan.py tests/test_recipe.py::test_a_name_list_is_one_run
                   tests/test_recipe.py::test_erase_from_is_a_name_or_a_list_of_names
                   tests/test_baselines.py::test_method_defaults_are_each_methods_own_and_typed_flags_win) ;;
        erase-baselines) mutate=(recare_cli/erase/uce.py recare_cli/erase/esd.py); tests=(tests/test_baselines.py tests/test_resume.py) ;;
        erase-stages)  # the two training stages: targets, losses, what reaches them, resume
            mutate=(recare_cli/erase/stage1.py recare_cli/erase/stage2.py)
            tests=(tests/test_erase_method.py tests/test_erase_stages.py tests/test_resume.py) ;;
        erase-loop)  # checkpoints, the loss log, tracking and the run's inputs: no model trained
            mutate=(recare_cli/erase/loop.py recare_cli/erase/tracking.py recare_cli/erase/inputs.py)
            tests=(tests/test_stage_loop.py tests/test_erase_inputs.py) ;;
        erase-wiring)  # what reaches each stage, reuse and outputs; the models' calls and the inversion's pieces
            mutate=(recare_cli/erase/run.py recare_cli/erase/context.py recare_cli/erase/inversion.py)
            tests=(tests/test_erase_wiring.py tests/test_erase_context_inversion.py tests/test_erase_method.py) ;;
        erase-traced)  # the UNet's traced calls: equal to the module's, per signature, counted
            mutate=(recare_cli/erase/traced.py); tests=(tests/test_erase_traced.py) ;;
        *) echo "unknown preset '$1' (fsutil, export-check, guidance, erase-pure, erase-request, erase-baselines, erase-stages, erase-loop, erase-wiring, erase-traced)" >&2
           exit 2 ;;
    esac
}

root=$(git rev-parse --show-toplevel)
python="$root/.venv/bin/python"
keep="" jobs=2 mutate=() tests=() names=()
while getopts "m:t:k:j:p:n:" opt; do
    case "$opt" in
        m) mutate+=("$OPTARG") ;;
        t) tests+=("$OPTARG") ;;
        k) keep="$OPTARG" ;;
        j) jobs="$OPTARG" ;;
        p) python="$OPTARG" ;;
        n) names+=("$OPTARG") ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -gt 0 ]; then preset "$1"; fi
if [ ${#mutate[@]} -eq 0 ] || [ ${#tests[@]} -eq 0 ]; then
    echo "usage: $0 PRESET | -m GLOB... -t TESTFILE... [-k DIR] [-j N] [-p PYTHON] [-n PATTERN...]" >&2
    exit 2
fi
python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"  # not realpath: a venv python is a symlink

if [ -n "$keep" ]; then
    scratch="$keep"
    mkdir -p "$scratch"
else
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
fi
git -C "$root" archive HEAD | tar -x -C "$scratch"
cd "$scratch"
MUTATE="${mutate[*]}" TESTS="${tests[*]}" "$python" - <<'PY'
import json
import os
from pathlib import Path

path = Path("pyproject.toml")
text = path.read_text()
text = text[: text.index("[tool.mutmut]")] + f'''[tool.mutmut]
source_paths = ["recare_cli"]
only_mutate = {json.dumps(os.environ["MUTATE"].split())}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = {json.dumps(os.environ["TESTS"].split())}
process_isolation = "forkserver"
forkserver_warmup = "import"
preload_modules_file = "bench/mutmut-preload.txt"
timeout_constant = 30.0
'''
path.write_text(text)
PY
# timeout_constant: mutmut's CPU-time limit counts only the tests' own time, not the fixtures that
# build and load a model in each mutant's fresh session; without the margin those mutants "time out".
# One torch thread per mutant: the jobs share 2 cores with whatever else runs (benchmarks first).
export OMP_NUM_THREADS=1
# The built-in models, built once and copied into each mutant's session (tests/conftest.py) rather
# than rebuilt there: the build was most of a mutant's time for the fast test files.
"$python" -c 'import sys; from pathlib import Path; from recare_cli.models import BUILTIN_MODELS, builtin_path
for name in BUILTIN_MODELS: builtin_path(name, Path(sys.argv[1]))' "$scratch/.test-cache"
export RECARE_TEST_MODELS="$scratch/.test-cache/models"
start=$(date +%s)
nice -n 15 "$python" -m mutmut run --max-children "$jobs" "${names[@]}" > mutmut-run.log 2>&1 || { tail -c 3000 mutmut-run.log; exit 1; }
echo "# $(date -u +%FT%TZ), $(( $(date +%s) - start )) s: ${mutate[*]} ${names[*]} against ${tests[*]}"
"$python" -m mutmut results --all true > results.txt
if [ ${#names[@]} -gt 0 ]; then  # `results` lists every mutant of the module; keep the ones asked for
    "$python" - "${names[@]}" <<'PY'
import fnmatch, sys
from pathlib import Path
lines = Path("results.txt").read_text().splitlines()
kept = [l for l in lines if any(fnmatch.fnmatch(l.split(": ")[0].strip(), p) for p in sys.argv[1:])]
Path("results.txt").write_text("".join(l + "\n" for l in kept))
PY
fi
cat results.txt
awk -F': ' '{n++; c[$2]++} END {printf "# %d mutants:", n; for (s in c) printf " %d %s", c[s], s; print ""}' results.txt
for name in $(awk -F': ' '$2 != "killed" {print $1}' results.txt); do
    "$python" -m mutmut show "$name"
done
exit
}
