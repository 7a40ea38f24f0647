#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: downloads the transformers version this
# project is tested with into .whl/ (ignored by git), for scripts/gpu_check.sh to install there.
# The GPU machine's image has torch, tokenizers, safetensors and huggingface_hub in versions
# transformers 5.24 accepts, but an older transformers (5.17 when last read).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "transformers==5.24.0"
ls -la .whl
