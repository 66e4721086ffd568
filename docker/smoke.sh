#!/usr/bin/env bash
# Build the CPU image and bring the compose swarm up for real, with podman; the last line of output is
# one JSON object. Run as root from anywhere:
#
#     bash docker/smoke.sh              # about 6 minutes with the base image cached
#     bash docker/smoke.sh --help       # options (the CUDA image, joiners, the cache, --dry-run)
#
# Exit status: 0 when everything checked held, 1 when a check failed, 2 on bad arguments, 77 when it
# was skipped (no root, no podman, no podman-compose), with the reason as the JSON's "skipped".
# The work is done by docker/smoke.py (Python's standard library only); see docs/docker.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../.venv/bin/python"
if [ ! -x "$python" ]; then
    python="$(command -v python3 || true)"
fi
if [ -z "$python" ]; then
    echo '{"skipped": "no python3 to run docker/smoke.py"}'
    exit 77
fi
exec "$python" "$here/smoke.py" "$@"
