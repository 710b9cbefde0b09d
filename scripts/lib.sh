# Shared by scripts/run-local and scripts/test: install what is missing, start project-owned
# servers, stop them again. Everything lives under .run/ (ignored by git).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUN_DIR="$ROOT/.run"
VENV="$ROOT/.venv"
SECANTUS_VERSION="0.7.0b3"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

ensure_rabbitmq() {
  if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    log "installing RabbitMQ (Debian package rabbitmq-server)"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq rabbitmq-server >/dev/null
    # The package starts a system node where an init system runs; ours are separate nodes.
  fi
}

ensure_secantus() {
  if ! "$VENV/bin/python" -c "import secantus" >/dev/null 2>&1; then
    log "installing SecantusDB $SECANTUS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "secantusdb==$SECANTUS_VERSION"
  fi
}

# free_port: a TCP port nobody listens on now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for_port() { # host port seconds
  local deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    [ $SECONDS -ge $deadline ] && { log "nothing listens on $1:$2 after $3 s"; return 1; }
    sleep 0.2
  done
}

# start_secantus PORT STORAGE LOGFILE  -> sets SECANTUS_PID
start_secantus() {
  "$VENV/bin/python" -m secantus --host 127.0.0.1 --port "$1" --storage-path "$2" \
    --oplog-max-entries 20000 --oplog-retention-seconds 120 --log-level WARNING >"$3" 2>&1 &
  SECANTUS_PID=$!
  wait_for_port 127.0.0.1 "$1" 60
}
