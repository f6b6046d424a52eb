#!/usr/bin/env bash
# Install pacs-node into ./.venv.  `--dev` adds what the tests need: pytest,
# ruff and mypy, and Debian's dcmtk and dicom3tools (real DICOM peers and the
# dciodvfy validator), Orthanc, and docker-compose (it validates
# deploy/docker-compose.yml without a Docker engine) when they are missing and
# we are root. deploy/Dockerfile repeats the two pip steps below (a test checks).
#
# torch==2.13.0 is installed first and every later pip call is constrained to
# it (constraints.txt): an unpinned torch, or a package that depends on one,
# would otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ "$dev" = 1 ]; then
  need=()
  command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
  command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
  # a real PACS for the end-to-end tests, with its DICOMweb plugin
  command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
  [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
  # validates deploy/docker-compose.yml (`docker-compose config` needs no engine)
  command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "installing Debian packages: ${need[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "warning: please install Debian packages ${need[*]} (the tests that use them are skipped)" >&2
    fi
  fi
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
if [ "$dev" = 1 ]; then
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,nnunet]"
else
  .venv/bin/python -m pip install -q -c constraints.txt -e .
fi
if [ "$dev" = 1 ]; then
  # the viewer tests: Debian's chromium, Playwright (no browser download), OHIF v3's prebuilt dist/
  bash scripts/install_viewer.sh
fi
echo "pacs-node installed in .venv ($(.venv/bin/pacs-node --version))"
