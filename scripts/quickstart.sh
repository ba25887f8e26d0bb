#!/usr/bin/env bash
# quickstart.sh: from a fresh machine to a trained small GPT-2 on tinyshakespeare, on the CPU:
# installs the packages, prepares the data, builds, trains a few hundred steps and samples.
#   bash scripts/quickstart.sh                     # online: downloads tinyshakespeare
#   bash scripts/quickstart.sh --input FILE        # offline: a local copy of input.txt
# Offline, also set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's GPT-2 files.
set -euo pipefail
cd "$(dirname "$0")/.."
input_args=("$@")

if ! command -v make >/dev/null || ! { [ -e /usr/include/cblas.h ] || ls /usr/include/*/cblas.h >/dev/null 2>&1; }; then
    echo "--- installing build tools and OpenBLAS (apt-get)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq build-essential libopenblas-dev python3-pip
fi
echo "--- installing Python packages (requirements.txt)"
python3 -m pip install -q -r requirements.txt

echo "--- preparing tinyshakespeare"
python3 data/tinyshakespeare.py "${input_args[@]}"

echo "--- building"
make train_gpt2

echo "--- training a 4-layer GPT-2 (d4) for 300 steps, sampling at the end"
./train_gpt2 -e d4 -b 8 -t 64 -x 300 -l 2e-3 -u 20 -q 0.1 -c 0.1 -v 50 -m 10 -s 300 -g 96 -o out/quickstart
