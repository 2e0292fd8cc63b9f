#!/usr/bin/env bash
# Byte-identity of trained weights across two commits (a refactor must not change a number).
# Checks out REV_A and REV_B as git worktrees under DIR, runs in each (one torch thread, no MLflow)
# the lineage of the `full` pipeline's distill stage, CoPD's stages (pipeline `copd`) and the
# TrOPD and Uni-OPD variants, then prints the sha256 of every model side by side.
# usage: benchmarks/same_weights.sh REV_A REV_B [DIR]     (about 25 min per revision on 2 cores)
set -euo pipefail
A=$1 B=$2 DIR=${3:-/tmp/mopd-same-weights}
ROOT=$(git rev-parse --show-toplevel)
PY=${PY:-$ROOT/.venv/bin/python}
run() {  # $1: worktree
  local P=$1
  export PYTHONPATH=$P MOPD_THREADS=1 MOPD_PROJECT_DIR=$P
  st() { echo "== $(date +%T) $P $*"; (cd "$P" && "$PY" -m mopd.cli stage "$@" --project-dir "$P" --no-track > /dev/null); }
  for s in data base sft teacher:math teacher:code teacher:if difficulty distill; do st "$s" --pipeline full; done
  for c in 1 2; do for ph in rl opd; do for d in math code if; do st "copd:$c:$ph:$d" --pipeline copd; done; done; done
  st distill:tropd --pipeline tropd
  st distill:uniopd --pipeline uniopd
}
for rev in "$A" "$B"; do
  [ -d "$DIR/$rev" ] || git -C "$ROOT" worktree add -q "$DIR/$rev" "$rev"
  run "$DIR/$rev"
done
status=0
for f in $(cd "$DIR/$A" && find artifacts -name model.safetensors | sort); do
  a=$(sha256sum "$DIR/$A/$f" | cut -c1-16); b=$(sha256sum "$DIR/$B/$f" 2>/dev/null | cut -c1-16 || echo missing)
  [ "$a" = "$b" ] && verdict=same || { verdict=DIFFERENT; status=1; }
  printf '%-48s %s %s %s\n' "$f" "$a" "$b" "$verdict"
done
exit $status
