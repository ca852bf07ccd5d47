#!/usr/bin/env bash
# One entry point for setting up and running BoundFlow from a fresh checkout.
#
#   bash scripts/run.sh demo            build the toy example, print its certified bounds
#   bash scripts/run.sh test [ARGS]     run the test suite (pytest -q -n 2 --dist loadgroup ARGS)
#   bash scripts/run.sh setup           only create / update .venv
#   bash scripts/run.sh cli ARGS        run the boundflow CLI inside .venv
#
# The virtual environment lives in .venv at the repo root; it is created when absent and
# reused otherwise. The project is installed editable with the test extra (test: also the tvm
# and ray extras); the install is skipped when .venv/.boundflow-stamp matches pyproject.toml and the
# extras, so re-runs start at once.
# PYTHON=/path/to/python3.11 picks the interpreter used to create .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.boundflow-stamp"

usage() {  # usage [exit code]
    sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit "${1:-2}"
}

find_python() {
    local c
    for c in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$c"
            return 0
        fi
    done
    echo "run.sh: need Python >= 3.11 (set PYTHON=...)" >&2
    return 1
}

setup() {  # setup [EXTRAS]: install boundflow with these extras (default: test)
    local extras="${1:-test}"
    if [ ! -x "$PY" ]; then
        local base
        base="$(find_python)"
        echo "run.sh: creating $VENV with $base" >&2
        "$base" -m venv "$VENV"
    fi
    local want
    want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])') $extras"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/boundflow" ]; then
        return 0
    fi
    echo "run.sh: installing boundflow (editable, with the extras $extras) into $VENV" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
    echo "$want" > "$STAMP"
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift

case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        "$PY" examples/make_example.py --out examples/generated
        echo
        "$VENV/bin/boundflow" bounds examples/generated/toy_mlp.onnx \
            --vnnlib examples/generated/toy_prop.vnnlib --method crown
        ;;
    test)
        setup test,tvm,ray      # the TVM executor's and run-suite --ray's tests run too
        set +e
        # loadgroup: the tests of one xdist_group (the Ray ones, which share a Ray) on one worker
        "$PY" -m pytest -q -n 2 --dist loadgroup "$@"
        rc=$?
        set -e
        exit "$rc"
        ;;
    cli)
        setup
        exec "$VENV/bin/boundflow" "$@"
        ;;
    -h|--help|help)
        usage 0
        ;;
    *)
        echo "run.sh: unknown command '$cmd'" >&2
        usage
        ;;
esac
