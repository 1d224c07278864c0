#!/bin/sh
# Install the Debian packages the test suite drives as real peers, skipping those present.
set -eu
packages="tshark tcpdump redis-server redis-tools socat tmux curl openssl dnsutils dnsmasq-base jq bsdextrautils proxychains4 iptables microsocks dante-server tinyproxy"
missing=""
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $package"
done
python3 -c 'import ensurepip' 2>/dev/null || missing="$missing python3-venv"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
echo "installing:$missing"
$sudo apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
