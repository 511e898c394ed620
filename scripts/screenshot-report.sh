#!/usr/bin/env bash
# Screenshot an evaluation's report.html in a real browser: headless Chromium (Debian's `chromium` package,
# `apt-get install chromium`), a laptop-sized window, no network. Not needed by the tests.
#   scripts/screenshot-report.sh demo/runs/nih/eval/report.html docs/report-screenshot.png [WIDTH,HEIGHT]
set -euo pipefail
report=${1:?usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]}
out=${2:?usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]}
size=${3:-1366,2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "error: no chromium on PATH: apt-get install chromium" >&2; exit 1; }
[ -f "$report" ] || { echo "error: $report: no such file (run cxr eval first)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$size" --screenshot="$(realpath -m "$out")" "file://$(realpath "$report")" >/dev/null 2>&1
[ -s "$out" ] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "wrote $out"
