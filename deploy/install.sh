#!/bin/sh
# Installs shardstore from a source checkout: binary, systemd unit, config,
# service user and data dir. Idempotent: running it again upgrades the
# binary and unit and leaves an edited config alone.
#
#   cargo build --release --locked
#   sudo deploy/install.sh [BINARY]          # default target/release/shardstore
#   DESTDIR=/tmp/root deploy/install.sh      # stage into a tree (packaging,
#                                            # tests): no user, no chown, no systemctl
#   BINDIR=/usr/local/bin deploy/install.sh  # binary elsewhere; the installed
#                                            # unit's ExecStart follows it
#
# Afterwards: review /etc/shardstore/shardstore.toml (capacity_mib is
# preallocated per shard), then `systemctl enable --now shardstore`.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
bin=${1:-$root/target/release/shardstore}
DESTDIR=${DESTDIR:-}
BINDIR=${BINDIR:-/usr/bin}
UNITDIR=${UNITDIR:-/usr/lib/systemd/system}
CONFDIR=/etc/shardstore
DATADIR=/var/lib/shardstore

# BINDIR goes into the unit's ExecStart (and a sed expression): an
# absolute path of plain characters only.
case $BINDIR in
    /*) ;;
    *) echo "install.sh: BINDIR must be an absolute path, not $BINDIR" >&2; exit 1 ;;
esac
case $BINDIR in
    *[!A-Za-z0-9/._+-]*)
        echo "install.sh: BINDIR may hold only letters, digits and / . _ + -: $BINDIR" >&2
        exit 1 ;;
esac

if [ ! -x "$bin" ]; then
    echo "install.sh: $bin is not an executable; build it first (cargo build --release --locked)" >&2
    exit 1
fi

say() { printf 'install.sh: %s\n' "$*"; }

install -d -m 0755 "$DESTDIR$BINDIR" "$DESTDIR$UNITDIR" "$DESTDIR/usr/lib/sysusers.d"
install -d -m 0755 "$DESTDIR$CONFDIR"
install -d -m 0750 "$DESTDIR$DATADIR"

# Replace the binary atomically (a running server keeps its old inode).
install -m 0755 "$bin" "$DESTDIR$BINDIR/shardstore.new"
mv -f "$DESTDIR$BINDIR/shardstore.new" "$DESTDIR$BINDIR/shardstore"
say "installed $DESTDIR$BINDIR/shardstore"

# The unit runs /usr/bin/shardstore; another BINDIR is written into it.
unit="$DESTDIR$UNITDIR/shardstore.service"
sed "s|^ExecStart=/usr/bin/shardstore |ExecStart=$BINDIR/shardstore |" \
    "$here/shardstore.service" > "$unit.new"
if ! grep -q "^ExecStart=$BINDIR/shardstore " "$unit.new"; then
    rm -f "$unit.new"
    echo "install.sh: $here/shardstore.service has no ExecStart=/usr/bin/shardstore line to point at $BINDIR" >&2
    exit 1
fi
chmod 0644 "$unit.new"
mv -f "$unit.new" "$unit"
say "installed $unit (ExecStart=$BINDIR/shardstore)"

# For systemd-sysusers (images, DESTDIR installs); the real install below
# creates the user directly.
printf 'u shardstore - "shardstore server" %s /usr/sbin/nologin\n' "$DATADIR" \
    > "$DESTDIR/usr/lib/sysusers.d/shardstore.conf"
chmod 0644 "$DESTDIR/usr/lib/sysusers.d/shardstore.conf"

conf="$DESTDIR$CONFDIR/shardstore.toml"
if [ -e "$conf" ]; then
    if cmp -s "$here/shardstore.toml" "$conf"; then
        say "kept $conf (unchanged)"
    else
        install -m 0640 "$here/shardstore.toml" "$conf.dist"
        say "kept your $conf; the new example is $conf.dist"
    fi
else
    install -m 0640 "$here/shardstore.toml" "$conf"
    say "installed $conf"
fi

if [ -n "$DESTDIR" ]; then
    say "DESTDIR install: skipped user creation, ownership and systemctl"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root for a system install (or set DESTDIR)" >&2
    exit 1
fi
if ! getent passwd shardstore >/dev/null 2>&1; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /usr/lib/sysusers.d/shardstore.conf
    else
        useradd --system --user-group --home-dir "$DATADIR" --no-create-home \
            --shell /usr/sbin/nologin shardstore
    fi
    say "created user shardstore"
fi
chown shardstore:shardstore "$DATADIR"
chgrp shardstore "$conf"
"$BINDIR/shardstore" config check --memlock-unlimited "$conf" >/dev/null || \
    say "warning: $conf does not pass 'shardstore config check'"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemd reloaded; start with: systemctl enable --now shardstore"
fi
