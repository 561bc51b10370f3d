#!/usr/bin/env bash
# Make Debian 12's bookworm-backports available to apt (QEMU >= 9 and
# linux-source-6.12 live there), using the mirror this machine already uses
# for bookworm. Does nothing if backports is configured already.
set -euo pipefail

if apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    exit 0
fi
uri=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
if [ -z "$uri" ]; then
    # deb822 stanzas: the one whose Suites list plain "bookworm"
    uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
        BEGIN { RS = ""; FS = "\n" }
        /(^|\n)Suites:([^\n]* )?bookworm( |\n|$)/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^URIs:/) { split($i, f, " "); print f[2]; exit }
        }')
fi
if [ -z "$uri" ]; then
    echo "no bookworm mirror found in /etc/apt; add bookworm-backports by hand" >&2
    exit 1
fi
echo "adding bookworm-backports from $uri"
echo "deb $uri bookworm-backports main" > /etc/apt/sources.list.d/vfiod-backports.list
apt-get update -q
