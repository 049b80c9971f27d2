#!/usr/bin/env bash
# Fetch Fashion-MNIST's four IDX files into DEST (default data/fashion-mnist).
#
# The files come from Debian's `dataset-fashion-mnist` package: `apt-get download` needs no
# root (only the package lists, which `apt-get update` refreshes when the package is unknown
# and we are root), and `dpkg -x` unpacks without installing. Idempotent: skips when DEST
# already holds the files. Atomic: everything is staged in a temp dir next to DEST and moved
# into place, so an interrupted run leaves nothing half-written.
set -euo pipefail

DEST="${1:-data/fashion-mnist}"
PACKAGE=dataset-fashion-mnist
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

have_all() {
    local f
    for f in "${FILES[@]}"; do
        [[ -f "$DEST/$f" || -f "$DEST/$f.gz" ]] || return 1
    done
}

if have_all; then
    echo "fashion-mnist: already in $DEST"
    exit 0
fi
for tool in apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "fashion-mnist: '$tool' not found (needs a Debian/Ubuntu system)" >&2; exit 1; }
done

mkdir -p "$(dirname "$DEST")"
WORK="$(mktemp -d "$(dirname "$DEST")/.fashion-mnist.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# An unknown package usually means stale or missing lists; only root can refresh them.
if ! apt-cache show "$PACKAGE" >/dev/null 2>&1; then
    if [[ "$(id -u)" -eq 0 ]]; then
        apt-get update -qq
    else
        echo "fashion-mnist: apt does not know $PACKAGE; run 'sudo apt-get update' once and retry" >&2
        exit 1
    fi
fi

(cd "$WORK" && apt-get download -qq "$PACKAGE")
dpkg -x "$WORK"/"$PACKAGE"_*.deb "$WORK/root"

mkdir "$WORK/out"
for f in "${FILES[@]}"; do
    # The package may ship plain or gzipped IDX files; the loader reads both.
    found="$(find "$WORK/root" -type f \( -name "$f" -o -name "$f.gz" \) | head -n 1)"
    [[ -n "$found" ]] || { echo "fashion-mnist: $f not found in $PACKAGE" >&2; exit 1; }
    cp "$found" "$WORK/out/"
done

# A fresh DEST appears in one rename; into an existing one each file is renamed on its own,
# so whatever else the user keeps there stays untouched.
if [[ -e "$DEST" ]]; then
    mv -f "$WORK"/out/* "$DEST"/
else
    mv "$WORK/out" "$DEST"
fi
echo "fashion-mnist: $(ls "$DEST" | tr '\n' ' ')-> $DEST"
