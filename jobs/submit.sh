#!/usr/bin/env bash
# Submit a job from jobs/ to a Ray cluster:  jobs/submit.sh JOB [key=value ...] [--follow]
# The same as `ranray submit` (see `ranray submit --help`), using the repo's .venv when it has one.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/ranray" ]]; then
    ranray="$repo/.venv/bin/ranray"
else
    ranray="$(command -v ranray)" || { echo "submit.sh: ranray is not installed (make venv)" >&2; exit 2; }
fi
cd "$repo"
exec "$ranray" submit "$@"
