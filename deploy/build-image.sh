#!/usr/bin/env bash
# Builds turnpike's OCI image with Debian's buildah, from scratch: no base image, nothing
# pulled from a registry. The image holds exactly what the binary needs at run time:
#
#   /usr/bin/turnpike                 the binary (entrypoint)
#   the shared libraries `ldd` names  with the dynamic loader, at the paths ldd prints
#   /etc/passwd, /etc/group           root and the user it runs as, turnpike (65532:65532)
#   /etc/nsswitch.conf                hosts: files dns (glibc resolves --control, etcd names)
#   /etc/ssl/certs/ca-certificates.crt  the host's CA bundle, for `turnpike probe` of turns:
#   /usr/share/doc/PKG/copyright      the licences of the Debian packages the libraries are from
#   /tmp, /proc, /sys, /dev           empty: the runtime mounts them
#
# tests/tests/image.rs proves that this is complete: it mounts the image, chroots into it
# and relays coturn's uclient traffic through the entrypoint.
#
#   deploy/build-image.sh [BINARY] [TAG]
#     BINARY  default target/release/turnpike (build it first: cargo build --release -p turnpike)
#     TAG     default localhost/turnpike:latest (the name deploy/*.yaml use)
#
# Run as root (or inside `buildah unshare`). buildah's storage driver is its default
# (overlay); where overlay does not work, STORAGE_DRIVER=vfs. Prints the image id last.
set -euo pipefail
# BINARY is taken relative to where the script is called from, the default to the repository.
BIN=target/release/turnpike
if [ -n "${1:-}" ]; then BIN="$(realpath -e -- "$1" 2>/dev/null || echo "$1")"; fi
cd "$(dirname "$0")/.."

TAG="${2:-localhost/turnpike:latest}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
UID_GID=65532

die() { echo "build-image: $*" >&2; exit 1; }
command -v buildah >/dev/null || die "buildah is not installed (apt-get install buildah)"
[ -x "$BIN" ] || die "$BIN is not an executable (cargo build --release -p turnpike)"
[ -f "$CA_BUNDLE" ] || die "$CA_BUNDLE is missing (apt-get install ca-certificates)"
version="$("$BIN" --version | awk '{print $NF}')"
[ -n "$version" ] || die "$BIN --version printed no version"

stage="$(mktemp -d)"
ctr=""
cleanup() {
  rm -rf "$stage"
  if [ -n "$ctr" ]; then buildah rm "$ctr" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# The root filesystem, staged: root-owned, read-only to the user the server runs as.
install -D -m 0755 "$BIN" "$stage/usr/bin/turnpike"

# Every library the loader will map, and the loader itself ("/lib64/ld-linux-x86-64.so.2
# (0x...)"), copied to the path ldd prints (symlinks resolved).
libs="$(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)"
[ -n "$libs" ] || die "ldd found no library in $BIN (a static binary needs none: drop this check)"
pkgs=()
for lib in $libs; do
  install -D -m 0755 "$(readlink -f "$lib")" "$stage$lib"
  # The Debian package the library comes from, for its copyright file.
  # (dpkg knows the path ldd prints or, on a merged /usr, the resolved one.)
  pkg="$( (dpkg -S "$lib" || dpkg -S "$(readlink -f "$lib")") 2>/dev/null | head -n1 | cut -d: -f1 || true)"
  if [ -n "$pkg" ]; then pkgs+=("$pkg"); fi
done
for pkg in $(printf '%s\n' "${pkgs[@]}" | sort -u); do
  if [ -f "/usr/share/doc/$pkg/copyright" ]; then
    install -D -m 0644 "/usr/share/doc/$pkg/copyright" "$stage/usr/share/doc/$pkg/copyright"
  fi
done

install -d -m 0755 "$stage/etc" "$stage/proc" "$stage/sys" "$stage/dev" "$stage/etc/ssl/certs"
install -d -m 1777 "$stage/tmp"
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nturnpike:x:%s:%s:turnpike:/nonexistent:/usr/sbin/nologin\n' \
  "$UID_GID" "$UID_GID" > "$stage/etc/passwd"
printf 'root:x:0:\nturnpike:x:%s:\n' "$UID_GID" > "$stage/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$stage/etc/nsswitch.conf"
chmod 0644 "$stage/etc/passwd" "$stage/etc/group" "$stage/etc/nsswitch.conf"
install -m 0644 "$CA_BUNDLE" "$stage/etc/ssl/certs/ca-certificates.crt"

ctr="$(buildah from scratch)"
buildah copy --quiet "$ctr" "$stage" / >/dev/null
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
buildah config \
  --entrypoint '["/usr/bin/turnpike"]' \
  --cmd '["serve", "--listen", "0.0.0.0:3478", "--metrics-listen", "0.0.0.0:9478"]' \
  --user "$UID_GID:$UID_GID" \
  --workingdir / \
  --stop-signal SIGTERM \
  --port 3478/udp --port 3478/tcp --port 5349/tcp --port 9478/tcp \
  --label org.opencontainers.image.title=turnpike \
  --label "org.opencontainers.image.description=TURN relay (RFC 8656). Runs as 65532; binding port 443 needs CAP_NET_BIND_SERVICE, XDP CAP_NET_ADMIN and CAP_BPF. Give the relay address: TURNPIKE_RELAY_IP or --relay-ip." \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.created=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label org.opencontainers.image.source=https://example.invalid/turnpike \
  "$ctr"
# --rm: the working container goes with the commit.
id="$(buildah commit --quiet --rm "$ctr" "$TAG")"
ctr=""
echo "build-image: $TAG ($version, $(printf '%s' "$libs" | wc -w) libraries)" >&2
echo "$id"
