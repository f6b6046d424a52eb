#!/usr/bin/env bash
# What the viewer and dashboard tests need, and the OHIF viewer the node can serve:
#
#   - Debian's chromium (when missing and we are root; no browser is downloaded by Playwright),
#   - Playwright for Python in ./.venv (constrained like every other pip call, see constraints.txt),
#   - OHIF v3's prebuilt viewer, the dist/ folder of the npm package @ohif/app, unpacked into
#     .cache/ohif/<version>/ (skipped when present; `npm pack` fetches the tarball from the npm registry).
#
# scripts/install.sh --dev calls it. Set OHIF_VERSION to try another 3.x release.
set -euo pipefail
cd "$(dirname "$0")/.."

OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
cache=".cache/ohif"
target="$cache/$OHIF_VERSION"

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing Debian's chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is not installed (apt-get install chromium); the viewer and dashboard tests skip" >&2
  fi
fi

if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip install -q -c constraints.txt playwright
else
  echo "warning: no .venv yet; run scripts/install.sh first" >&2
fi

if [ -f "$target/dist/index.html" ]; then
  echo "OHIF $OHIF_VERSION already in $target"
elif ! command -v npm >/dev/null 2>&1; then
  echo "warning: npm is not installed; OHIF cannot be fetched (the viewer tests skip)" >&2
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching @ohif/app@$OHIF_VERSION from the npm registry"
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  mkdir -p "$tmp/unpacked"
  tar -xzf "$tmp"/ohif-app-"$OHIF_VERSION".tgz -C "$tmp/unpacked"
  if [ ! -f "$tmp/unpacked/package/dist/index.html" ]; then
    echo "error: @ohif/app@$OHIF_VERSION has no prebuilt dist/index.html" >&2
    exit 1
  fi
  mkdir -p "$cache"
  rm -rf "$target.partial"
  mkdir -p "$target.partial"
  mv "$tmp/unpacked/package/dist" "$target.partial/dist"
  cp "$tmp/unpacked/package/package.json" "$target.partial/package.json"
  mv "$target.partial" "$target"
  echo "OHIF $OHIF_VERSION unpacked in $target/dist"
fi
