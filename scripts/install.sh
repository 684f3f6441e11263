#!/usr/bin/env bash
# Install atlaspatch-stream into ./.venv (or $VENV). Usage: scripts/install.sh [--test] [--extras hf,openclip,...]
# torch/torchvision are pinned to the versions on this machine's disk; sam2 is built without CUDA and without build
# isolation (a plain `pip install sam2` would fetch a second torch into an isolated build environment).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="fast"
while [ $# -gt 0 ]; do
  case "$1" in
    --test) EXTRAS="$EXTRAS,test" ;;
    --extras) shift; EXTRAS="$EXTRAS,$1" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
$VENV/bin/python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 $PIP install -q --no-build-isolation "sam2>=1.1"
case ",$EXTRAS," in
  *,musk,*) EXTRAS="${EXTRAS//,musk/}"; $PIP install -q "einops>=0.7"; $PIP install -q --no-deps "torchscale>=0.3" "fairscale>=0.4" ;;
esac
$PIP install -q -e ".[$EXTRAS]"
echo "installed into $VENV (extras: $EXTRAS)"
