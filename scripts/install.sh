#!/usr/bin/env bash
# Install atlaspatch-stream into ./.venv (or $VENV). Usage: scripts/install.sh [--test] [--extras hf,openclip,...]
# torch/torchvision come from constraints.txt (the exact versions on this machine's disk; the package itself pins
# nothing exactly); sam2 is built without CUDA and without build isolation (a plain `pip install sam2` would fetch a
# second torch into an isolated build environment).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="fast"
TEST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --test) EXTRAS="$EXTRAS,test"; TEST=1 ;;
    --extras) shift; EXTRAS="$EXTRAS,$1" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
CONSTRAINTS="-c constraints.txt"
$PIP install -q --upgrade pip setuptools wheel
$PIP install -q $CONSTRAINTS torch torchvision
$VENV/bin/python -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 $PIP install -q $CONSTRAINTS --no-build-isolation "sam2>=1.1"
case ",$EXTRAS," in
  *,musk,*) EXTRAS="${EXTRAS//,musk/}"; $PIP install -q "einops>=0.7"; $PIP install -q --no-deps "torchscale>=0.3" "fairscale>=0.4" ;;
esac
case ",$EXTRAS," in
  *,moozy,*) EXTRAS="${EXTRAS//,moozy/}"; $PIP install -q --no-deps "moozy>=0.1.1" ;;
esac
$PIP install -q $CONSTRAINTS -e ".[$EXTRAS]"
if [ "$TEST" = 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # the QC gallery's browser test drives Debian's chromium (it skips without one)
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
    || echo "chromium not installed: the QC gallery's browser test will skip" >&2
fi
echo "installed into $VENV (extras: $EXTRAS)"
