#!/usr/bin/env bash
# Installs the system packages Porten needs when they are missing, and says so.
set -euo pipefail
apt_updated=0
install() {  # install PACKAGE WHAT-WAS-MISSING
  echo "porten: $2 is missing; installing Debian package '$1' with apt-get..."
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ "$apt_updated" -eq 0 ]; then $sudo apt-get update -q >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$1" >/dev/null
  echo "porten: installed $1."
}
need() {  # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 || install "$2" "$1"
}
postgres_bin() {  # where Debian puts PostgreSQL's server programs (not on PATH)
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}
for dep in "$@"; do
  case "$dep" in
    redis) need redis-server redis-server ;;
    chromium) need chromium chromium ;;
    postgres) [ -x "$(postgres_bin)/initdb" ] || install postgresql "PostgreSQL's initdb" ;;
    *) echo "unknown dependency $dep" >&2; exit 2 ;;
  esac
done
