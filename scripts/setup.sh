#!/usr/bin/env bash
# Set-up for a fresh machine of this kind (Debian, Python 3.11, root, no venv):
# Python packages from PyPI, and the Debian tools the tests and benchmarks use.
set -euo pipefail
PY=${PY:-python3}
cd "$(dirname "$0")/.."

"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test,dev]'

need=()
for tool in rsync:rsync sshd:openssh-server ssh:openssh-client lsyncd:lsyncd setfacl:acl getfattr:attr; do
    cmd=${tool%%:*} pkg=${tool#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing Debian packages ${need[*]}; install them as root" >&2
        exit 1
    fi
    echo "setup: installing Debian packages: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "setup: ok"
