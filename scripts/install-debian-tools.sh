#!/usr/bin/env bash
# Install the Debian tools the tests drive (real NBD clients and servers, fio; Prometheus, promtool and
# systemd-analyze for the deployment files),
# when they are missing. Needs root for apt-get; without root it only reports.
set -euo pipefail

# command:package pairs
tools=(qemu-img:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdfuse:libnbd-bin
       nbdkit:nbdkit fio:fio fuse2fs:fuse2fs mkfs.ext4:e2fsprogs e2fsck:e2fsprogs zstd:zstd tar:tar
       prometheus:prometheus promtool:prometheus systemd-analyze:systemd openssl:openssl nbdsh:python3-libnbd
       jq:jq fallocate:util-linux unshare:util-linux nsenter:util-linux ip:iproute2)

# header:package pairs (bench/replication_bench.py --c-mirror builds an nbdkit plugin)
headers=(nbdkit-plugin.h:nbdkit-plugin-dev)

missing=()
for pair in "${tools[@]}"; do
  cmd=${pair%%:*}
  pkg=${pair##*:}
  if ! command -v "$cmd" >/dev/null 2>&1; then
    [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
  fi
done
for pair in "${headers[@]}"; do
  [ -e "/usr/include/${pair%%:*}" ] || missing+=("${pair##*:}")
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
