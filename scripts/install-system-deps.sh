#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real (redis-server, nginx, chromium),
# only those missing, so repeated `make test` runs stay fast.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# Sentinel (tests/e2e: failover) is its own Debian package.
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
# Node and npm run the AI SDK's own client in tests/test_ui_message_stream.py (make node-deps).
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# Fonts for the web UI's browser-test screenshots (chromium pulls none by itself).
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts services on install; the tests run their own on free ports.
for service in redis-server redis-sentinel nginx; do
  $SUDO service "$service" stop >/dev/null 2>&1 || true
done
