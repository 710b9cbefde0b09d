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

# ensure_promtool: the Prometheus project's own linter for /metrics (tests/e2e/exposition.rs).
# Debian ships it in the prometheus package; its server is never started here.
ensure_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    log "installing promtool (Debian package prometheus)"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
}

ensure_secantus() {
  if ! "$VENV/bin/python" -c "import secantus" >/dev/null 2>&1; then
    log "installing SecantusDB $SECANTUS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "secantusdb==$SECANTUS_VERSION"
  fi
}

# ensure_chromium: the browser that tests/compat/browser.js runs the browser SDKs in, driven by
# playwright-core: Debian's chromium package (/usr/bin/chromium), never a browser build that
# playwright would download.
ensure_chromium() {
  if [ ! -x /usr/bin/chromium ]; then
    log "installing Chromium (Debian package chromium)"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null || {
      log "could not install the chromium package"
      return 1
    }
  fi
}

# ensure_compat_clients: the published SDKs the compatibility suite (tests/e2e/compat.rs) runs
# unmodified: the Python ones pinned in tests/compat/requirements.txt into $VENV, the Node ones
# (and playwright-core) from tests/compat/package-lock.json into tests/compat/node_modules
# (npm ci), and Chromium for the browser SDKs (ensure_chromium). Needs node 20+.
ensure_compat_clients() {
  local dir="$ROOT/tests/compat"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  if ! "$VENV/bin/python" - "$dir/requirements.txt" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    name, _, pinned = line.split("#")[0].strip().partition("==")
    if name and version(name) != pinned:
        sys.exit(1)
PY
  then
    log "installing the Python SDKs pinned in tests/compat/requirements.txt into $VENV"
    "$VENV/bin/pip" install -q -r "$dir/requirements.txt" || {
      log "could not install tests/compat/requirements.txt"
      return 1
    }
  fi

  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node and npm are missing: the compatibility suite (tests/compat) needs Node.js 20 or later with npm"
    return 1
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 20 ]; then
    log "node $(node --version) is too old: the compatibility suite (tests/compat) needs Node.js 20 or later"
    return 1
  fi
  # npm ci empties node_modules first; the stamp says which lock file it last installed.
  # A second try: npm 11 once failed to create a scoped package's directory on a fresh
  # install here (ENOENT on mkdir), and succeeded when run again.
  if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.installed-package-lock.json"; then
    log "installing the Node SDKs from tests/compat/package-lock.json (npm ci)"
    local try
    for try in 1 2; do
      (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2) && break
      [ "$try" -eq 2 ] && { log "npm ci in tests/compat failed"; return 1; }
      log "npm ci failed; trying once more"
    done
    cp "$dir/package-lock.json" "$dir/node_modules/.installed-package-lock.json"
  fi
  ensure_chromium
}

# free_port: a TCP port nobody listens on now, outside 35672-35682 (RabbitMQ's CLI tools take
# their own distribution ports there).
free_port() {
  python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    if not 35672 <= port <= 35682: print(port); break'
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
