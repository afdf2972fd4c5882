#!/usr/bin/env bash
# Unpacks Debian's tuxpaint-stamps-default (950 captioned stamps, GPL-2) into
# .cache/tuxpaint without installing it, for connectors/tuxpaint.py and its test.
# Idempotent; exits 0 with a note when apt cannot fetch it (the test then skips).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=.cache/tuxpaint
if [ -d /usr/share/tuxpaint/stamps ] || [ -d "$dest/usr/share/tuxpaint/stamps" ]; then
  exit 0
fi
command -v apt-get >/dev/null || { echo "fetch_tuxpaint: no apt-get; real-image test will skip"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && apt-get download -q tuxpaint-stamps-default >/dev/null 2>&1 ) \
  || { apt-get update -qq >/dev/null 2>&1 && ( cd "$tmp" && apt-get download -q tuxpaint-stamps-default >/dev/null 2>&1 ); } \
  || { echo "fetch_tuxpaint: apt-get download failed; real-image test will skip"; exit 0; }
mkdir -p "$dest"
dpkg -x "$tmp"/tuxpaint-stamps-default_*.deb "$dest"
# The package is mostly sounds; only images and captions are used.
find "$dest" -type f \( -name '*.ogg' -o -name '*.wav' \) -delete
echo "fetch_tuxpaint: stamps in $dest/usr/share/tuxpaint/stamps"
