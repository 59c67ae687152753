#!/usr/bin/env bash
# Run CI exactly as the CI machine does: in a fresh clone of the committed HEAD.
# Untracked or uncommitted files are not there, so a missing `git add` shows up here.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
dest="$(mktemp -d /tmp/am-fresh-XXXXXX)"
git clone --quiet "$src" "$dest/am"
cd "$dest/am"
# CI keeps shared/ beside the clone; tests never read it, but mirror the layout.
[ -d "$src/../shared" ] && ln -s "$src/../shared" "$dest/shared"
bash .ci/run "$@"
