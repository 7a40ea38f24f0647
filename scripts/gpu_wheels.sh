#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: downloads the transformers version this
# project is tested with into .whl/ (ignored by git), for scripts/gpu_check.sh to install there.
# The GPU machine's image has torch, tokenizers, safetensors and huggingface_hub in versions
# transformers 5.24 accepts, but an older transformers (5.17 when last read). transformers
# checks regex's version at import (>= 2025.10.22), which the image's may not meet, so regex
# travels too, built for the GPU machine's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -f .whl/*.whl  # two versions of one package would stop the install there
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "transformers==5.24.0"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "regex==2026.5.9"
ls -la .whl
