#!/usr/bin/env bash
# The demo: generate a sample tree, replicate it to a local secondary, change it,
# replicate again, and show what moved each time and that the trees are equal.
set -euo pipefail
PY=${PY:-python3}
cd "$(dirname "$0")/.."
DEMO=${GEOREP_DEMO_DIR:-/tmp/georep-demo}
rm -rf "$DEMO"
mkdir -p "$DEMO"
echo "== generating a sample tree in $DEMO/primary"
"$PY" -m tests.support.treegen "$DEMO/primary" --entries 3000 --seed 1 --big-dir-files 500 \
    > "$DEMO/tree.json"
"$PY" - "$DEMO/tree.json" <<'PYEOF'
import json, sys
t = json.load(open(sys.argv[1]))
print(f"  {t['entries']} entries: {t['dirs']} directories, {t['files']} files "
      f"({t['bytes'] / 2**20:.0f} MiB, one 256 MiB sparse), {t['symlinks']} symlinks, "
      f"{t['hardlink_groups']} hardlink groups, {t['non_utf8_names']} non-UTF-8 names, "
      f"{t['acl_entries']} ACLs, a {t['max_depth']}-level path, fifos and devices")
PYEOF
echo
echo "== first sync: bin/georep-node sync $DEMO/primary $DEMO/secondary --once"
bin/georep-node sync "$DEMO/primary" "$DEMO/secondary" --once
echo
echo "== changing the primary (renames, swaps, deletes, appends, chmod, hardlinks...)"
"$PY" -m tests.support.treegen "$DEMO/primary" --apply-changes --seed 2 > "$DEMO/changes.json"
echo "  renamed big5k/ (500 files) to moved/big5k.renamed, swapped two files, file<->dir,"
echo "  deleted a subtree, truncated, appended, overwrote 1 MiB of a 16 MiB file, chmod, chown,"
echo "  added and removed hardlinks, turned a symlink into a directory"
echo
echo "== second sync: only what changed moves; the renamed directory is one rename"
bin/georep-node sync "$DEMO/primary" "$DEMO/secondary" --once
echo
echo "== third sync, nothing changed: nothing moves"
bin/georep-node sync "$DEMO/primary" "$DEMO/secondary" --once
echo
echo "== comparing the trees (content, owners, modes, times, xattrs, ACLs, links, holes)"
"$PY" -m tests.support.compare "$DEMO/primary" "$DEMO/secondary" && echo "identical"
