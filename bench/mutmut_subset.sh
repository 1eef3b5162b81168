#!/usr/bin/env bash
# Mutation testing on the subset a shared 2-core machine finishes in minutes: recare_cli/fsutil.py
# against tests/test_fsutil.py (no model loads, so each mutant costs well under a second).
# The full configuration is pyproject.toml's [tool.mutmut] (`mutmut run`, hours on 2 cores).
# Runs in a scratch copy of the committed tree, so the working tree is never mutated.
#   bench/mutmut_subset.sh [PYTHON]        (default: .venv/bin/python)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
python=$(realpath "${1:-$root/.venv/bin/python}")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git -C "$root" archive HEAD | tar -x -C "$scratch"
cd "$scratch"
"$python" - <<'PY'
from pathlib import Path
path = Path("pyproject.toml")
text = path.read_text()
text = text[: text.index("[tool.mutmut]")] + '''[tool.mutmut]
source_paths = ["recare_cli"]
only_mutate = ["recare_cli/fsutil.py"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
pytest_add_cli_args_test_selection = ["tests/test_fsutil.py"]
process_isolation = "forkserver"
'''
path.write_text(text)
PY
nice -n 10 "$python" -m mutmut run --max-children 2 > mutmut-run.log 2>&1 || { tail -c 3000 mutmut-run.log; exit 1; }
"$python" -m mutmut results --all true
