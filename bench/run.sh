#!/usr/bin/env bash
# One command, from a clean checkout: install tidebase-agents with the bench extra and run the
# benchmark (every configuration, 3 repeats; results in bench/results/latest.json), then the
# model-turn journal's figures (bench/results/turns.json).
#
#   bash bench/run.sh                 # full run
#   bash bench/run.sh --quick         # smoke run; any bench.run option is passed through
#
# Python: $PYTHON if set, else the active virtualenv, else ./.venv (created if missing).
# PostgreSQL: $TIDEBASE_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/tidebase_bench);
# the benchmark creates (and recreates) its tidebase_bench* databases there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    py="$VIRTUAL_ENV/bin/python"
else
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    py=.venv/bin/python
fi

echo "installing tidebase-agents[bench] into $("$py" -c 'import sys; print(sys.prefix)')" >&2
log="$(mktemp)"
if ! "$py" -m pip install --disable-pip-version-check -e '.[bench]' >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
rm -f "$log"
export OPENAI_AGENTS_DISABLE_TRACING=1
"$py" -m bench.run "$@"

# The model-turn journal's figures (bench/turns.py, its own processes and databases):
# bench/results/turns.json. Skipped when only some configurations were asked for.
turns_args=()
for arg in "$@"; do
    case "$arg" in
        --only | --only=*) exit 0 ;;
        --quick) turns_args+=(--quick) ;;
    esac
done
exec "$py" -m bench.turns ${turns_args[@]+"${turns_args[@]}"}
