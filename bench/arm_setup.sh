#!/usr/bin/env bash
# An emulated 64-bit ARM CPU for bench/arm_check.py and tests/test_arm.py, unpacked into .arm/
# ($SKIN_UNET_ARM overrides), about 190 MB:
#   qemu-aarch64   QEMU 10 user mode, the static binary of Debian 13's qemu-user package
#   sysroot/       an arm64 Python 3.11 from Debian 12's arm64 packages
#   site/          aarch64 wheels of ai-edge-litert and numpy (versions from requirements.txt)
#
#     bash bench/arm_setup.sh
#
# Why QEMU 10 and not the host's: Debian 12's QEMU 7.2 gave wrong LiteRT outputs with its default CPU
# and crashed in XNNPACK's CPU probe. Nothing on the host changes: apt runs with its own state, cache
# and sources list under the work folder, with an empty dpkg status (so it resolves the arm64 Python's
# full dependency closure), and only downloads; dpkg-deb unpacks into folders; pip only downloads.
# Idempotent: a finished folder holds a stamp naming what it contains, and a rerun with the same
# stamp returns at once. It is built beside the target and renamed into place when complete, so an
# interrupted run never leaves a half-filled .arm/ that looks ready.
set -euo pipefail
cd "$(dirname "$0")/.."
ARM=${SKIN_UNET_ARM:-$PWD/.arm}
ARM=${ARM%/}
PYTHON=${PYTHON:-python}   # the environment that runs the tests: only its pip is used, to download

pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" requirements.txt; }
LITERT=$(pin ai-edge-litert)
NUMPY=$(pin numpy)
# The arm64 Python 3.11 and the C/C++ runtime LiteRT's wheel links against.
SYSROOT_PACKAGES="python3.11 libstdc++6 libgcc-s1 zlib1g"
STAMP="qemu-user/trixie python3.11/bookworm-arm64 ai-edge-litert==$LITERT numpy==$NUMPY arm_setup/1"

if [ "$(cat "$ARM/stamp" 2>/dev/null)" = "$STAMP" ]; then
    echo "arm_setup: $ARM is ready"
    exit 0
fi
STEP=start
trap 'echo "error: bench/arm_setup.sh: $STEP failed (see above)" >&2' ERR
started=$SECONDS
mkdir -p "$(dirname "$ARM")"
WORK=$(mktemp -d "$ARM.tmp-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
NEW=$WORK/arm
mkdir -p "$NEW/sysroot" "$NEW/site"

# apt_private NAME SUITE ARCH: an apt of its own (state, cache, sources, no host preferences or dpkg
# status) for one Debian suite and architecture; prints the options that select it.
apt_private() {
    local d=$WORK/apt-$1
    mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/etc/sources.list.d" "$d/etc/preferences.d"
    : > "$d/status"
    echo "deb [arch=$3 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $2 main" \
        > "$d/etc/sources.list"
    echo "-o Dir::State=$d -o Dir::State::Lists=$d/lists -o Dir::State::status=$d/status" \
         "-o Dir::Cache=$d -o Dir::Cache::Archives=$d/archives -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=" \
         "-o Dir::Etc::SourceList=$d/etc/sources.list -o Dir::Etc::SourceParts=$d/etc/sources.list.d" \
         "-o Dir::Etc::Preferences=$d/etc/preferences -o Dir::Etc::PreferencesParts=$d/etc/preferences.d" \
         "-o APT::Architecture=$3 -o APT::Architectures::=$3 -o Debug::NoLocking=1 -o APT::Sandbox::User=root"
}

STEP="apt update (Debian 13 amd64, Debian 12 arm64)"
QEMU_APT=$(apt_private qemu trixie amd64)
SYS_APT=$(apt_private sysroot bookworm arm64)
# shellcheck disable=SC2086  # the option lists are meant to split
apt-get $QEMU_APT -qq update
# shellcheck disable=SC2086
apt-get $SYS_APT -qq update

STEP="QEMU (Debian 13 qemu-user)"
mkdir -p "$WORK/debs-qemu"
# shellcheck disable=SC2086
(cd "$WORK/debs-qemu" && apt-get $QEMU_APT -qq download qemu-user)
dpkg-deb --fsys-tarfile "$WORK"/debs-qemu/qemu-user_*.deb | tar -x -C "$WORK/debs-qemu" ./usr/bin/qemu-aarch64
mv "$WORK/debs-qemu/usr/bin/qemu-aarch64" "$NEW/qemu-aarch64"

STEP="arm64 Python sysroot (Debian 12)"
# A simulated install against the empty status lists every package the Python needs.
# shellcheck disable=SC2086
PACKAGES=$(apt-get $SYS_APT -s -qq --no-install-recommends install $SYSROOT_PACKAGES | awk '/^Inst /{print $2}')
mkdir -p "$WORK/debs-sysroot"
# shellcheck disable=SC2086
(cd "$WORK/debs-sysroot" && apt-get $SYS_APT -qq download $PACKAGES)
for deb in "$WORK"/debs-sysroot/*.deb; do dpkg-deb -x "$deb" "$NEW/sysroot"; done
echo "$PACKAGES" | tr ' ' '\n' > "$NEW/packages.txt"

STEP="aarch64 wheels (pip download)"
# pip matches platform tags exactly, so every manylinux spelling an aarch64 wheel may carry is listed.
"$PYTHON" -m pip download -q --disable-pip-version-check --dest "$WORK/wheels" --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux_2_27_aarch64 --platform manylinux_2_28_aarch64 \
    "ai-edge-litert==$LITERT" "numpy==$NUMPY"
for wheel in "$WORK"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$NEW/site"; done
(cd "$WORK/wheels" && ls) > "$NEW/wheels.txt"

STEP="first run under the emulator"
# Proves the three parts fit together before the folder is stamped, and leaves the byte-compiled
# site packages behind, so later runs skip that (slow, emulated) work.
PYTHONPATH=$NEW/site PYTHONNOUSERSITE=1 "$NEW/qemu-aarch64" -cpu cortex-a76 -L "$NEW/sysroot" \
    "$NEW/sysroot/usr/bin/python3.11" -c \
    "import platform, numpy, ai_edge_litert.interpreter as i; print('arm_setup:', platform.machine(), platform.python_version(), 'numpy', numpy.__version__)"
"$NEW/qemu-aarch64" --version | head -1 > "$NEW/qemu-version.txt"
echo "$STAMP" > "$NEW/stamp"

STEP="moving into $ARM"
if [ -e "$ARM" ]; then mv "$ARM" "$WORK/old"; fi
mv "$NEW" "$ARM"
echo "arm_setup: $ARM ready in $((SECONDS - started)) s, $(du -sh "$ARM" | cut -f1) ($(cat "$ARM/qemu-version.txt"))"
