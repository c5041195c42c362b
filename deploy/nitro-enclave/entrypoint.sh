#!/bin/sh
# Enclave entrypoint: start the timesync guest daemon, wait until the clock is synchronised,
# then exec the application (given as arguments, e.g. the image's CMD). The daemon keeps
# disciplining the clock for the enclave's lifetime and reports its health to the relay on
# the parent, so the parent can watch this enclave's clock (timesync status --relay ...).
set -eu

RELAY="${TIMESYNC_RELAY:-vsock:3:123}"          # the parent instance is always CID 3
NAME="${TIMESYNC_NAME:-$(hostname 2>/dev/null || echo enclave)}"
STATUS_SOCKET="${TIMESYNC_STATUS_SOCKET:-/run/timesync/guest.sock}"
MAX_OFFSET="${TIMESYNC_MAX_OFFSET:-0.005}"      # seconds
WAIT_S="${TIMESYNC_WAIT_S:-120}"

mkdir -p "$(dirname "$STATUS_SOCKET")"
# --leap-mode ignore: the parent relays to Amazon Time Sync, which smears leap seconds; use
# --leap-mode kernel instead if your relay's upstreams announce leap seconds (docs/DEPLOYMENT.md)
timesync --log-json guest --relay "$RELAY" --clock system --name "$NAME" \
    --leap-mode ignore --status-socket "$STATUS_SOCKET" &
DAEMON_PID=$!

if ! timesync wait-sync --socket "$STATUS_SOCKET" --max-offset "$MAX_OFFSET" \
        --timeout "$WAIT_S"; then
    echo "timesync: clock not synchronised within ${WAIT_S} s; not starting the application" >&2
    kill "$DAEMON_PID" 2>/dev/null || true
    exit 1
fi

if [ "$#" -eq 0 ]; then
    echo "timesync: no application command given" >&2
    exit 2
fi
exec "$@"
