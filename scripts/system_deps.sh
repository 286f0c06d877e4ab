#!/usr/bin/env bash
# Installs the system packages Porten needs when they are missing, and says so.
set -euo pipefail
apt_updated=0
need() {  # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "porten: $1 is missing; installing Debian package '$2' with apt-get..."
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ "$apt_updated" -eq 0 ]; then $sudo apt-get update -q >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$2" >/dev/null
  echo "porten: installed $2."
}
for dep in "$@"; do
  case "$dep" in
    redis) need redis-server redis-server ;;
    chromium) need chromium chromium ;;
    *) echo "unknown dependency $dep" >&2; exit 2 ;;
  esac
done
