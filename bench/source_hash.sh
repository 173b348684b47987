#!/usr/bin/env bash
# Prints one sha256 of what bmssl._C is built from (setup.py and every file under csrc/ and
# kernels/), so that a module built elsewhere (bench/prebuild_for_device.sh) is used only with the
# sources it was built from. Needs no git: the GPU machine's copy of the tree has no .git.
set -euo pipefail
cd "$(dirname "$0")/.."
find setup.py csrc kernels -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
