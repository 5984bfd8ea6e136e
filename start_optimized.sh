#!/usr/bin/env bash
# The start script named in the API guide (section 10.2.3): (re)start the whole service.
# Environment variables (API_KEY_N, API_KEYS_ENCRYPTION_KEY, FLUX_*_MODEL_PATH, ...) pass through.
set -euo pipefail
cd "$(dirname "$0")"
exec make serve
