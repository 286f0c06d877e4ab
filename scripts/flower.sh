#!/usr/bin/env bash
# Starts Flower (Celery's task monitor) behind HTTP basic auth, in the foreground, as `make run` does.
#   PORTEN_FLOWER_USER      login name (default admin)
#   PORTEN_FLOWER_PASSWORD  its password; unset: one generated once into $PORTEN_VAR_DIR/flower_password
#   PORTEN_FLOWER_HOST      bind address (default 127.0.0.1)
#   PORTEN_FLOWER_PORT      port (default 5555)
# `scripts/flower.sh --check` only gets ready: it makes the password if needed and says where it is,
# and exits 1 (saying so) when the port is taken, so a caller can go on without Flower.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VAR_DIR="${PORTEN_VAR_DIR:-$PWD/var}"
FLOWER_USER="${PORTEN_FLOWER_USER:-admin}"
FLOWER_HOST="${PORTEN_FLOWER_HOST:-127.0.0.1}"
FLOWER_PORT="${PORTEN_FLOWER_PORT:-5555}"

# Flower splits its logins at commas and a login at its first colon.
case "$FLOWER_USER" in *[:,]*|"") echo "porten: PORTEN_FLOWER_USER must be non-empty, without ':' or ','" >&2; exit 2 ;; esac
if [ -n "${PORTEN_FLOWER_PASSWORD:-}" ]; then
  password="$PORTEN_FLOWER_PASSWORD"
  where="PORTEN_FLOWER_PASSWORD"
else
  password_file="$VAR_DIR/flower_password"
  if [ ! -s "$password_file" ]; then
    mkdir -p "$VAR_DIR"
    (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(18))' >"$password_file.tmp")
    mv "$password_file.tmp" "$password_file"
  fi
  password="$(cat "$password_file")"
  where="$password_file"
fi
case "$password" in *,*) echo "porten: the Flower password must not contain ','" >&2; exit 2 ;; esac

if ! "$PY" - "$FLOWER_HOST" "$FLOWER_PORT" <<'PY'
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family) as sock:
    # As a server binds (SO_REUSEADDR): a port left in TIME_WAIT is free, one with a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sys.exit(1)
PY
then
  echo "porten: port $FLOWER_PORT on $FLOWER_HOST is taken; going on without Flower (set PORTEN_FLOWER_PORT to use another)" >&2
  exit 1
fi

if [ "${1:-}" = "--check" ]; then
  echo "porten: Flower login: $FLOWER_USER, password in $where"
  exit 0
fi
# The login goes through Flower's environment variable rather than --basic-auth, so the password is
# not on a command line that every user of this machine can read (ps).
export FLOWER_BASIC_AUTH="$FLOWER_USER:$password"
exec .venv/bin/celery -A porten flower --address="$FLOWER_HOST" --port="$FLOWER_PORT"
