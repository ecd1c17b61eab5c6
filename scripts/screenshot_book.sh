#!/usr/bin/env bash
# Render the built book's index and every notebook page to PNG with headless Chromium, offline,
# so a person (or a reviewer) can check that figures, tables and math are really there.
#
#   scripts/screenshot_book.sh [HTML_DIR] [OUT_DIR]
#
# HTML_DIR defaults to _build/html, OUT_DIR to _build/screenshots. Needs Debian's chromium
# (apt-get install -y chromium). Each page gets a tall window (1280 x 2000 by default;
# SCREENSHOT_SIZE=1280,4000 for more) and a few seconds for MathJax to typeset.
set -euo pipefail

html_dir=${1:-_build/html}
out_dir=${2:-_build/screenshots}
size=${SCREENSHOT_SIZE:-1280,2000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "error: no chromium found; on Debian: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi
if [[ ! -f "$html_dir/index.html" ]]; then
    echo "error: $html_dir/index.html does not exist; build the book first (make book)" >&2
    exit 2
fi
mkdir -p "$out_dir"
profile_dir=$(mktemp -d)
trap 'rm -rf "$profile_dir"' EXIT

pages=("$html_dir/index.html" "$html_dir"/book/*.html "$html_dir"/notebooks/*.html)
for page in "${pages[@]}"; do
    [[ -f "$page" ]] || continue
    name=$(basename "$(dirname "$page")")_$(basename "$page" .html)
    [[ "$page" == "$html_dir/index.html" ]] && name=index
    "$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
        --user-data-dir="$profile_dir" --virtual-time-budget=8000 \
        --window-size="$size" --screenshot="$out_dir/$name.png" "file://$(realpath "$page")" \
        >/dev/null 2>&1
    echo "$out_dir/$name.png"
done
