#!/usr/bin/env bash
# Re-fetch the dashboard's charting library (uPlot, MIT) from the npm registry and vendor it into
# server/static/vendor/, so the master serves it itself (clusters are often offline: no CDN).
#
#   scripts/vendor_uplot.sh            fetch the pinned version, check it against the pins, copy it in
#   scripts/vendor_uplot.sh 1.6.33     move the pin to another version (rewrites uplot.lock.json)
#
# The pins (npm's sha512 integrity of the tarball, the sha256 of each vendored file) live in
# server/static/vendor/uplot.lock.json; tests/test_dashboard_assets.py checks the committed files against them.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=server/static/vendor
LOCK=$DEST/uplot.lock.json
PY=${PYTHON:-python3}
FILES=(dist/uPlot.iife.min.js dist/uPlot.min.css LICENSE)

pinned() { "$PY" -c "import json,sys; print(json.load(open('$LOCK'))[sys.argv[1]])" "$1"; }

NEW_VERSION=${1:-}
VERSION=${NEW_VERSION:-$(pinned version)}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && npm pack --silent "uplot@$VERSION" >/dev/null)
TGZ="$TMP/uplot-$VERSION.tgz"
INTEGRITY="sha512-$(openssl dgst -sha512 -binary "$TGZ" | base64 -w0)"
if [ -z "$NEW_VERSION" ] && [ "$INTEGRITY" != "$(pinned integrity)" ]; then
    echo "uplot@$VERSION from the registry has integrity $INTEGRITY, the pin says $(pinned integrity)" >&2
    exit 1
fi
tar xzf "$TGZ" -C "$TMP"
for f in "${FILES[@]}"; do
    name=$(basename "$f")
    [ "$name" = LICENSE ] && name=LICENSE-uPlot
    cp "$TMP/package/$f" "$DEST/$name"
done
"$PY" - "$VERSION" "$INTEGRITY" "$LOCK" "${NEW_VERSION:+update}" <<'PYEOF'
import hashlib, json, pathlib, sys
version, integrity, lock, update = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4] == "update"
files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
         for p in sorted(lock.parent.iterdir()) if p.name != lock.name}
doc = {"package": "uplot", "version": version, "license": "MIT", "integrity": integrity, "sha256": files}
if update or not lock.exists():
    lock.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"pinned uplot@{version}")
elif json.loads(lock.read_text())["sha256"] != files:
    sys.exit(f"the vendored files differ from the pins in {lock}")
else:
    print(f"uplot@{version}: vendored files match the pins")
PYEOF
