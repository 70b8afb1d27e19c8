#!/usr/bin/env bash
# Idempotent installer of everything the end-to-end tests (tests/e2e) and the etcd
# integration tests (controlplane/tests/etcd.rs) need, for a bare Debian 12 CI machine,
# run as root. A second run does no work and returns quickly.
#
#   apt:  coturn (turnserver, turnutils_uclient, turnutils_peer), chromium, iproute2,
#         nftables, procps, openssl (the per-run test PKI of the TLS tests),
#         libnss3-tools (certutil: the NSS database by which Chromium trusts the test CA),
#         etcd-server (etcd, started by the tests on loopback ports of their own),
#         etcd-client (etcdctl, which compacts history for the compaction test),
#         clang + libbpf-dev (the data plane's build script compiles the XDP program with
#         them), bpftool, ethtool (the XDP tests and benchmark: tx offload off on veths),
#         curl (the XDP tests scrape metrics inside a network namespace),
#         buildah + ca-certificates (deploy/build-image.sh builds the container image from
#         scratch with the host's CA bundle; tests/tests/image.rs runs it chrooted),
#         faketime (libfaketime: tests/tests/seam.rs steps and skews the wall clock of
#         a server, the monotonic clock untouched),
#         nginx (tests/tests/front_door.rs: the web server behind turnpike's shared 443
#         and 80, started by the test in a network namespace with its own configuration)
#   venv: tests/e2e/.venv with the pinned packages of tests/e2e/requirements.txt
#
# Installing coturn, etcd-server or nginx must not leave a system turnserver running on
# 3478, a system etcd on 2379 or a system nginx on 80: package scripts are kept from starting services (policy-rc.d
# answers 101 during the install), and the units are disabled where systemd is present.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"

APT_PKGS=(coturn chromium iproute2 nftables procps openssl libnss3-tools etcd-server etcd-client
          clang libbpf-dev bpftool ethtool curl buildah ca-certificates faketime nginx)
# The binary each package must provide (a package counts as installed only if it is there).
declare -A PROBE=(
  [coturn]=/usr/bin/turnserver
  [chromium]=/usr/bin/chromium
  [iproute2]=/usr/bin/ip
  [nftables]=/usr/sbin/nft
  [procps]=/usr/bin/pgrep
  [openssl]=/usr/bin/openssl
  [libnss3-tools]=/usr/bin/certutil
  [etcd-server]=/usr/bin/etcd
  [etcd-client]=/usr/bin/etcdctl
  [clang]=/usr/bin/clang
  [libbpf-dev]=/usr/include/bpf/bpf_helpers.h
  [bpftool]=/usr/sbin/bpftool
  [ethtool]=/usr/sbin/ethtool
  [curl]=/usr/bin/curl
  [buildah]=/usr/bin/buildah
  [ca-certificates]=/etc/ssl/certs/ca-certificates.crt
  [faketime]=/usr/bin/faketime
  [nginx]=/usr/sbin/nginx
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
     || [ ! -e "${PROBE[$p]}" ]; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup-deps: installing ${missing[*]}" >&2
  # Keep package maintainer scripts from starting daemons (coturn's turnserver on 3478).
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then saved="$(mktemp)"; $SUDO cp -p "$policy" "$saved"; fi
  restore_policy() {
    if [ -n "$saved" ]; then $SUDO cp -p "$saved" "$policy"; rm -f "$saved";
    else $SUDO rm -f "$policy"; fi
  }
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  restore_policy
  trap - EXIT
fi

# Never leave the distribution's coturn or etcd service enabled or running.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for unit in coturn etcd nginx; do
    if systemctl is-enabled --quiet "$unit" 2>/dev/null; then $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true; fi
    if systemctl is-active --quiet "$unit" 2>/dev/null; then $SUDO systemctl stop "$unit" >/dev/null 2>&1 || true; fi
  done
else
  if [ -f /var/run/turnserver.pid ] || [ -f /run/turnserver/turnserver.pid ]; then
    $SUDO service coturn stop >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/etcd ] && $SUDO service etcd status >/dev/null 2>&1; then
    $SUDO service etcd stop >/dev/null 2>&1 || true
  fi
  if [ -x /etc/init.d/nginx ] && $SUDO service nginx status >/dev/null 2>&1; then
    $SUDO service nginx stop >/dev/null 2>&1 || true
  fi
fi

# Python venv with pinned packages.
VENV="$ROOT/tests/e2e/.venv"
REQ="$ROOT/tests/e2e/requirements.txt"
PY="${E2E_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY="$(command -v python3)"; fi
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup-deps: creating $VENV" >&2
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's python3 needs python3-venv for ensurepip.
    $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
  echo "$want" > "$stamp"
fi
echo "setup-deps: ok" >&2
