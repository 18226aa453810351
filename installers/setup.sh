#!/usr/bin/env bash
# scopeside set-up for a Debian/Ubuntu machine, then (optionally) run something.
#
#   bash installers/setup.sh demo [ARGS]   set up, then: scopeside demo --headless [ARGS]
#   bash installers/setup.sh test [ARGS]   set up (with test tools), then: ruff + the whole test suite
#   bash installers/setup.sh gui           set up, install the desktop launcher, open the GUI
#   bash installers/setup.sh               set up only
#
# Idempotent: a second run checks and installs nothing new. See installers/README.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCOPESIDE_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"
ACTION="${1:-none}"
[ $# -gt 0 ] && shift

# pip on some machines warns about configured local package folders that do not exist: hide that noise
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
say() { printf '[scopeside setup] %s\n' "$*" >&2; }

# --- system libraries (Qt offscreen + xcb, fonts, virtual screen) ------------------------------
QT_LIBS=(libegl1 libgl1 libx11-6 libdbus-1-3 libfontconfig1 libfreetype6 libglib2.0-0
         libxkbcommon0 fonts-dejavu-core libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
         libxcb-image0 libxcb-keysyms1 libxcb-render-util0 libxcb-render0 libxcb-shape0
         libxcb-util1 libxcb-xkb1 xvfb xauth)
# for the test suite: a real single-node SLURM, headless Chromium for the report test,
# RELION 3.1 (CPU) to prove it reads our particles.star
TEST_LIBS=(slurmctld slurmd slurm-client munge chromium relion)

need=("${QT_LIBS[@]}")
[ "$ACTION" = test ] && need+=("${TEST_LIBS[@]}")
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing system packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # install one by one on failure so a single unavailable package (e.g. relion on an
        # older distribution) does not stop the rest; tests that need it skip with a reason
        if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            for p in "${missing[@]}"; do
                apt-get install -y -qq --no-install-recommends "$p" >/dev/null \
                    || say "WARNING: could not install $p"
            done
        fi
    else
        say "missing system packages; as root run:"
        say "  apt-get install -y --no-install-recommends ${missing[*]}"
    fi
fi

# --- Python and the virtual environment ------------------------------------------------------
"$PYTHON" - <<'PY' || { say "Python >= 3.11 is required (set PYTHON=/path/to/python3.11)"; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || { say "python venv failed: apt-get install python3-venv"; exit 2; }
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip --disable-pip-version-check -q)


gpu=no
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=yes; fi
extras="dev"
[ "$gpu" = yes ] && extras="dev,gpu"

# re-install only when pyproject.toml or the extras changed
stamp="$VENV/.scopeside-installed"
want="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)-$extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if [ "$gpu" = no ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        # a bare `torch` would pull a multi-GB CUDA build: take the CPU build on CPU machines
        say "installing the CPU build of torch"
        "${PIP[@]}" install "torch==2.13.0"
    fi
    say "installing scopeside [$extras] (GPU: $gpu)"
    "${PIP[@]}" install -e "$REPO[$extras]"
    echo "$want" > "$stamp"
fi

install_launcher() {
    local apps="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
    local icons="${XDG_DATA_HOME:-$HOME/.local/share}/icons/hicolor/scalable/apps"
    mkdir -p "$apps" "$icons"
    cp "$REPO/resources/icons/scopeside.svg" "$icons/scopeside.svg"
    sed "s|@EXEC@|$VENV/bin/scopeside-gui|" "$REPO/installers/scopeside.desktop.in" \
        > "$apps/scopeside.desktop"
    say "desktop launcher: $apps/scopeside.desktop"
}

cd "$REPO"
case "$ACTION" in
    none) say "ready: $VENV/bin/scopeside" ;;
    demo) exec "$VENV/bin/scopeside" demo --headless "$@" ;;
    gui) install_launcher; exec "$VENV/bin/scopeside-gui" "$@" ;;
    launcher) install_launcher ;;
    test)
        export QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}"
        "$VENV/bin/ruff" check "$REPO"
        exec "$VENV/bin/python" -m pytest "$@" ;;
    *) say "unknown action '$ACTION' (demo | test | gui | launcher)"; exit 2 ;;
esac
