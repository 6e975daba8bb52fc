#!/usr/bin/env bash
# Fill one machine's asv history over a list of commits, in the current Python (no builds):
# each commit's code is checked out in a temporary worktree and put first on the benchmark
# processes' path (ASV_PYTHONPATH), measured by THIS checkout's suite, and saved under that
# commit's hash in benchmarks/asv_results/$MACHINE/. Commits whose code lacks what the suite
# calls record failures or skips, as asv does for any commit.
#
#   MACHINE=cpu-2core bash benchmarks/asv_history.sh benchmarks/history_commits.txt
#
# COMMITS_FILE: one commit a line (anything after the hash is a comment; # lines are skipped),
# measured in that order until DEADLINE_S (default 2400) has passed. Optional: BENCH (asv --bench
# regex), ASV_ARGS (extra asv run arguments; default "-a repeat=3": three samples per time_
# benchmark, enough for the interquartile range `diffattn report` reads as noise).
set -euo pipefail
cd "$(dirname "$0")/.."
machine=${MACHINE:?set MACHINE to this machine\'s results folder name, e.g. cpu-2core}
commits=${1:?usage: MACHINE=name bash benchmarks/asv_history.sh COMMITS_FILE}
deadline=$(( $(date +%s) + ${DEADLINE_S:-2400} ))
python3 benchmarks/scripts/asv_machine.py "$machine" > /dev/null  # with its details, not blank ones
tmp=$(mktemp -d)
cleanup() { for w in "$tmp"/*; do [ -d "$w" ] && git worktree remove --force "$w"; done; rm -rf "$tmp"; }
trap cleanup EXIT
read -ra extra <<< "${ASV_ARGS:--a repeat=3}"
while read -r c _; do
    [[ -z $c || $c == \#* ]] && continue
    if (( $(date +%s) >= deadline )); then echo "asv_history: deadline reached, not measured from $c on"; break; fi
    full=$(git rev-parse --verify "$c^{commit}")
    git worktree add --detach "$tmp/$c" "$full" > /dev/null 2>&1
    echo "asv_history: $c ($(git log -1 --format=%s "$full" | cut -c1-70))"
    ASV_PYTHONPATH="$tmp/$c" asv run --python=same --machine "$machine" --set-commit-hash "$full" \
        ${BENCH:+--bench "$BENCH"} "${extra[@]}" || echo "asv_history: asv exited $? on $c"
    git worktree remove --force "$tmp/$c"
done < "$commits"
