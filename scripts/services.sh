#!/usr/bin/env bash
# Make sure the services the tests use run on loopback:
#   PostgreSQL 127.0.0.1:5432, database `test`, user postgres without a password (trust, loopback only);
#   RabbitMQ   127.0.0.1:5672, guest/guest (the distributed mode's default broker);
#   Redis      127.0.0.1:6379, no persistence (the other broker the distributed mode supports).
# Starts installed services that are stopped; installs missing ones (Debian packages) when we
# are root. Prints what it did; never fails the caller by itself (tests that need a service
# fail in CI when it is down, and skip elsewhere).
set -uo pipefail

as_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  echo "installing $* (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } \
    || echo "could not install $*" >&2
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 "$2"); do port_open "$1" && return 0; sleep 1; done; return 1; }

# -- PostgreSQL ------------------------------------------------------------------------------
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1 || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  if as_root; then
    apt_install postgresql
    ver=$(ls /etc/postgresql | head -n1)
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    # Tests connect over loopback without a password: trust loopback only.
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  else
    echo "PostgreSQL is not installed; its tests will be skipped (they fail in CI)" >&2
  fi
fi

if command -v pg_isready >/dev/null 2>&1 && ! pg_up; then
  ver=$(ls /etc/postgresql | head -n1)
  echo "starting PostgreSQL $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main start || true
  for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi

if pg_up; then
  if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
    su postgres -c "createdb test" 2>/dev/null || true
  fi
  echo "PostgreSQL is up on 127.0.0.1:5432"
else
  echo "PostgreSQL did not come up" >&2
fi

# -- RabbitMQ --------------------------------------------------------------------------------
if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if as_root; then apt_install rabbitmq-server; else
      echo "RabbitMQ is not installed; its tests will be skipped (they fail in CI)" >&2
    fi
  fi
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "starting RabbitMQ"
    # -detached returns at once; the broker takes a few seconds to listen
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_port 5672 60 || true
  fi
fi
if port_open 5672; then echo "RabbitMQ is up on 127.0.0.1:5672"; else echo "RabbitMQ did not come up" >&2; fi

# -- Redis -----------------------------------------------------------------------------------
if ! port_open 6379; then
  if ! command -v redis-server >/dev/null 2>&1; then
    if as_root; then apt_install redis-server; else
      echo "Redis is not installed; its tests will be skipped (they fail in CI)" >&2
    fi
  fi
  if command -v redis-server >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null 2>&1 || true
    wait_port 6379 20 || true
  fi
fi
if port_open 6379; then echo "Redis is up on 127.0.0.1:6379"; else echo "Redis did not come up" >&2; fi
exit 0
