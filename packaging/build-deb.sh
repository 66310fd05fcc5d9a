#!/usr/bin/env bash
# build-deb.sh - build the Debian package: release binary, man pages and shell
# completions generated from the CLI definition, then cargo-deb (metadata in Cargo.toml).
#
#   packaging/build-deb.sh            # -> target/debian/sitewire_<version>-1_<arch>.deb
#
# Reproducible: SOURCE_DATE_EPOCH defaults to the last commit's time; generated assets
# carry no dates. Needs cargo-deb (cargo install cargo-deb --locked) and dpkg-dev
# (dpkg-shlibdeps, for the libc dependency).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
target="${CARGO_TARGET_DIR:-target}"

cargo build --release --bin sitewire
rm -rf target/assets
"$target/release/sitewire" generate-assets --out target/assets >/dev/null
# Stripped: the release profile keeps line tables for backtraces, the package does not need them.
cargo deb --no-build --strip --output target/debian/ "$@"
