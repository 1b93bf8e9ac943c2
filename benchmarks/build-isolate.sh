#!/usr/bin/env bash
# Build isolate (https://github.com/ioi/isolate), the peer benchmarks/core.py compares against,
# into a scratch directory, with a configuration that keeps everything it touches there.
#
#   benchmarks/build-isolate.sh SCRATCH_DIR [SOURCE]
#
# SOURCE is a directory holding isolate's source, a bare git directory of its repository (its
# HEAD is exported), or a git URL to clone (default: https://github.com/ioi/isolate). The result:
#
#   SCRATCH_DIR/bin/isolate   built with its config file compiled in as SCRATCH_DIR/default.cf
#   SCRATCH_DIR/default.cf    box_root, lock_root and cg_root under SCRATCH_DIR, uids 60000+
#   SCRATCH_DIR/boxes/        box_root (isolate wants it and its ancestors writable by root only)
#
# isolate 2.x drives cgroup v2 only (--cg); on a host whose cgroup v2 hierarchy has no
# controllers, run it without --cg: no memory or process limits, time limits and --meta work.
# Needs root to run boxes; build dependencies (libcap-dev, libseccomp-dev, libsystemd-dev,
# pkg-config, gcc, make) are installed with apt-get when missing.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 SCRATCH_DIR [SOURCE_DIR|GIT_DIR|GIT_URL]" >&2
    exit 2
fi
mkdir -p "$1"
scratch=$(cd "$1" && pwd)
source=${2:-https://github.com/ioi/isolate}

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
missing=()
for pkg in libcap-dev libseccomp-dev libsystemd-dev pkg-config gcc make; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing build dependencies: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

src="$scratch/src"
if [ -f "$source/isolate.c" ] && [ "$(cd "$source" && pwd)" = "$src" ]; then
    :  # building again from the copy an earlier run left here
elif [ -f "$source/isolate.c" ]; then
    rm -rf "$src"
    cp -a "$source" "$src"
elif git --git-dir="$source" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    rm -rf "$src"
    mkdir -p "$src"
    git --git-dir="$source" archive HEAD | tar -x -C "$src"
    git --git-dir="$source" rev-parse HEAD > "$src/COMMIT"
else
    rm -rf "$src"
    git clone -q --depth 1 "$source" "$src"
    git -C "$src" rev-parse HEAD > "$src/COMMIT"
fi

# Only the programs: the manual pages need asciidoc. CONFIG is compiled into the binary, so
# everything is rebuilt (-B): a copied tree may hold objects made for another scratch dir.
make -C "$src" -s -B CONFIG="$scratch/default.cf" isolate isolate-check-environment
mkdir -p "$scratch/bin" "$scratch/boxes" "$scratch/locks" "$scratch/cgroup"
install -m 0755 "$src/isolate" "$src/isolate-check-environment" "$scratch/bin/"
chmod 0755 "$scratch" "$scratch/boxes"

cat > "$scratch/default.cf" <<EOF
# isolate configuration for the benchmarks: everything under $scratch.
box_root = $scratch/boxes
lock_root = $scratch/locks
# Read only with --cg (cgroup v2), which the benchmarks do not use.
cg_root = $scratch/cgroup
first_uid = 60000
first_gid = 60000
num_boxes = 100
EOF

echo "built $("$scratch/bin/isolate" --version | head -n 1) (commit $(cat "$src/COMMIT" 2>/dev/null \
    || echo unknown)) into $scratch/bin/isolate"
