#!/usr/bin/env bash
# Install ichnode as a system service (run as root from the repository root):
# a virtual environment in /opt/ichnode, the config in /etc/ichnode, data in
# /var/lib/ichnode, and the systemd unit. Re-running upgrades the package,
# keeps an existing /etc/ichnode/config.yaml and replaces the unit (local
# settings go in a drop-in: systemctl edit ichnode).
set -euo pipefail
cd "$(dirname "$0")/.."

install -D -m 0644 systemd/ichnode.sysusers.conf /usr/lib/sysusers.d/ichnode.conf
systemd-sysusers /usr/lib/sysusers.d/ichnode.conf

# ichnode needs Python 3.11 or newer (setup.cfg); PYTHON names another interpreter.
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "ichnode needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
"$PYTHON" -m venv /opt/ichnode/venv
/opt/ichnode/venv/bin/pip install -q --upgrade pip
/opt/ichnode/venv/bin/pip install -q .
install -m 0644 README.md /opt/ichnode/README.md
# The administrators' commands (check-config, echo, status, results) on PATH.
ln -sfn /opt/ichnode/venv/bin/ichnode /usr/local/bin/ichnode

if [ ! -e /etc/ichnode/config.yaml ]; then
    install -d -m 0755 /etc/ichnode
    # Same defaults, with the data under the service's state directory.
    sed -e 's|^  spool_dir: .*|  spool_dir: /var/lib/ichnode/spool|' \
        -e 's|^  url: sqlite:///.*|  url: sqlite:////var/lib/ichnode/ichnode.db|' \
        config.yaml > /etc/ichnode/config.yaml
fi
/opt/ichnode/venv/bin/ichnode check-config --config /etc/ichnode/config.yaml >/dev/null

# The unit is replaced at each run: local settings belong in a drop-in
# (systemctl edit ichnode), which is kept. Say so when a changed unit is replaced.
if [ -e /etc/systemd/system/ichnode.service ] \
    && ! cmp -s systemd/ichnode.service /etc/systemd/system/ichnode.service; then
    echo "note: replacing /etc/systemd/system/ichnode.service, which differs from systemd/ichnode.service;" \
        "local changes to it (Environment=, ReadWritePaths=) are lost: put them in a drop-in with" \
        "'sudo systemctl edit ichnode'" >&2
    diff -u /etc/systemd/system/ichnode.service systemd/ichnode.service >&2 || true
fi
install -D -m 0644 systemd/ichnode.service /etc/systemd/system/ichnode.service
systemctl daemon-reload
# A running node goes on with the code it loaded: an upgrade restarts it.
if systemctl is-active --quiet ichnode.service; then
    systemctl restart ichnode.service
fi
systemctl enable --now ichnode.service
systemctl --no-pager status ichnode.service || true
