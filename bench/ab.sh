#!/usr/bin/env bash
# Before/after on one machine in one run: the engine benchmark rows and the N-sessions benchmark of
# an older commit (BEFORE, default d9aef47, unpacked with `git archive` into a temp dir) and of this
# working tree (AFTER), interleaved round by round (before, after, before, after, ...), then the
# comparison table (bench/ab_report.py). Logs and JSON go to $OUT (default ./ab-out); a run that
# fails is logged and reported, the others go on (exit status 1 at the end if any failed).
#
#   bash bench/ab.sh                                    # GPU: P1-P3 rows and 1-4 sessions, 2 rounds
#   ROUNDS=1 PARTS=sessions bash bench/ab.sh            # only the sessions benchmark, once each
#   bash bench/ab.sh report                             # the table again from what $OUT holds
#   ROUNDS=1 PARTS=engine ROWS=p3 TAG=-p3 bash bench/ab.sh   # a part of its own (TAG keeps earlier files)
#   ROWS=p2 CHUNKS=2 WARMUP=1 SESSIONS=1,2 SESSION_CHUNKS=2 DTYPE=float32 \
#     EXTRA_ARGS="--model tiny --device cpu --size 32" bash bench/ab.sh   # a CPU smoke run
#
# DTYPE is passed explicitly (default bfloat16, the engine's own default on a GPU): engine_bench at
# d9aef47 refuses a run without --dtype.
set -euo pipefail

AFTER="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BEFORE="${BEFORE:-d9aef47}"
OUT="$(mkdir -p "${OUT:-./ab-out}" && cd "${OUT:-./ab-out}" && pwd)"
PYTHON="${PYTHON:-python3}"
ROUNDS="${ROUNDS:-2}"
PARTS="${PARTS:-engine sessions}"
ROWS="${ROWS:-p1,p2,p3}"
CHUNKS="${CHUNKS:-30}"
WARMUP="${WARMUP:-8}"
SESSIONS="${SESSIONS:-1,2,3,4}"
SESSION_CHUNKS="${SESSION_CHUNKS:-30}"
SESSION_ROW="${SESSION_ROW:-p2}"
TAG="${TAG:-}"  # appended to the file names: several calls can fill one $OUT (the report reads them all)
DTYPE="${DTYPE:-bfloat16}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

report() {
  (cd "$AFTER" && PYTHONPATH="$AFTER" "$PYTHON" -m bench.ab_report "$OUT")
}

if [[ "${1:-}" == "report" ]]; then
  report
  exit 0
fi

BEFORE_TREE="$(mktemp -d "${TMPDIR:-/tmp}/ab-before.XXXXXX")"
trap 'rm -rf "$BEFORE_TREE"' EXIT
BEFORE_SHA="$(git -C "$AFTER" rev-parse --verify "$BEFORE^{commit}")"
git -C "$AFTER" archive "$BEFORE_SHA" | tar -x -C "$BEFORE_TREE"
# the sessions benchmark is newer than the commits it compares: the same file measures both trees
cp "$AFTER/bench/sessions_bench.py" "$BEFORE_TREE/bench/sessions_bench.py"
{
  echo "before: $BEFORE_SHA ($BEFORE)"
  echo "after:  $(git -C "$AFTER" rev-parse HEAD) in $AFTER, $(git -C "$AFTER" status --porcelain | wc -l) changed paths"
  echo "rounds: $ROUNDS, parts: $PARTS, rows: $ROWS ($CHUNKS chunks, $WARMUP warm-up), sessions: $SESSIONS ($SESSION_ROW, $SESSION_CHUNKS chunks), dtype $DTYPE, extra: ${EXTRA_ARGS:-}"
} | tee -a "$OUT/trees$TAG.txt"

failed=0
run() {  # run SIDE NAME ARGS...: python -m ARGS in that side's tree, log to $OUT/NAME.log
  local side="$1" name="$2"
  shift 2
  local tree="$AFTER"
  [[ "$side" == before ]] && tree="$BEFORE_TREE"
  echo "== $(date -u +%H:%M:%S) $name: python -m $*"
  if (cd "$tree" && PYTHONPATH="$tree" "$PYTHON" -m "$@") > "$OUT/$name.log" 2>&1; then
    tail -n 8 "$OUT/$name.log"
  else
    echo "!! $name FAILED (exit $?), last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log"
    failed=1
  fi
}

for round in $(seq 1 "$ROUNDS"); do
  if [[ " $PARTS " == *" engine "* ]]; then
    for side in before after; do
      run "$side" "engine-$side-$round$TAG" bench.engine_bench --rows "$ROWS" --chunks "$CHUNKS" --warmup "$WARMUP" \
        --dtype "$DTYPE" --json "$OUT/engine-$side-$round$TAG.json" ${EXTRA[@]+"${EXTRA[@]}"}
    done
  fi
  if [[ " $PARTS " == *" sessions "* ]]; then
    for side in before after; do
      run "$side" "sessions-$side-$round$TAG" bench.sessions_bench --row "$SESSION_ROW" --sessions "$SESSIONS" \
        --chunks "$SESSION_CHUNKS" --warmup "$WARMUP" --dtype "$DTYPE" --json "$OUT/sessions-$side-$round$TAG.json" \
        ${EXTRA[@]+"${EXTRA[@]}"}
    done
  fi
done

report
exit "$failed"
