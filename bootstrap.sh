#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine, run as root:
#   ./bootstrap.sh lab    install what is needed, bring up a 3-host lab, check it, and
#                         show a Podman web server on h2 answering a Docker client on h1
#   ./bootstrap.sh test   install what is needed, run linters and the whole test suite
#   ./bootstrap.sh install
#                         install overlayd on this host for real: /opt/overlayd,
#                         overlayd and overlayctl in /usr/local/bin, overlay-cni in
#                         /opt/cni/bin, /etc/overlayd/overlayd.toml, the CNI network
#                         "overlay" (overlay-cni, then portmap for published ports) in
#                         /etc/cni/net.d/10-overlay.conflist for Podman and other CNI
#                         runtimes, the systemd unit (enabled and started when systemd runs)
#   ./bootstrap.sh install-etcd IP [CLIENT...]
#                         a single-member etcd on https://IP:2379 (and 127.0.0.1)
#                         that wants a client certificate from everyone: a CA, etcd's
#                         server certificate, an admin client certificate (CN root) and
#                         one per CLIENT (default: this machine's host name), made by
#                         overlayd.lab.pki in /etc/overlayd/pki (kept if already there);
#                         the default network config (config/network.json) if none is set
# Environment: HOSTS (lab size, default 3), LAB_KEEP=0 (remove the lab after
# its check; by default it stays up to be explored). For install:
# OVERLAYD_ETCD_ENDPOINTS, OVERLAYD_ETCD_CAFILE, OVERLAYD_ETCD_CERTFILE,
# OVERLAYD_ETCD_KEYFILE, OVERLAYD_IFACE, OVERLAYD_EGRESS go into the new
# /etc/overlayd/overlayd.toml (an existing one is left alone). For
# install-etcd: OVERLAYD_PKI_DIR (default /etc/overlayd/pki).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
venv="$here/.venv"

say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap.sh: run as root (the lab and the tests create network namespaces)" >&2
    exit 1
fi

install_system_packages() {
    local missing=()
    for cmd in etcd etcdctl ip bridge ping tcpdump nft iptables ss sysctl iperf3 sockperf \
        ethtool mosquitto vagrant systemd-analyze modprobe curl; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    # The container engines the lab and the tests run inside lab hosts, and
    # the statically linked busybox their images are built from.
    for cmd in podman runc conmon dockerd containerd; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/portmap ] ||
        missing+=(cni-plugins)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    say "installing Debian packages (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-pip etcd-server etcd-client iproute2 \
        iputils-ping tcpdump nftables iptables procps iperf3 sockperf ethtool \
        mosquitto containernetworking-plugins vagrant systemd kmod curl \
        podman runc conmon docker.io containerd busybox-static >/dev/null
}

load_bridge_netfilter() {
    # The lab's default egress mode (gwbridge) needs br_netfilter, which Debian
    # builds as a module and loads for nobody; without it every gwbridge host
    # in the lab and the tests stops with "load br_netfilter".
    [ -e /proc/sys/net/bridge ] && return
    modprobe br_netfilter 2>/dev/null ||
        say "warning: cannot load br_netfilter; gwbridge labs and tests will fail"
}

install_overlayd_package() {
    say "installing overlayd into /opt/overlayd"
    python3 -m venv /opt/overlayd
    /opt/overlayd/bin/pip install -q --upgrade pip
    /opt/overlayd/bin/pip install -q "$here"
}

install_host() {
    say "installing Debian packages overlayd needs at run time"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv iproute2 \
        iputils-ping nftables iptables ethtool kmod containernetworking-plugins >/dev/null
    local name
    for name in OVERLAYD_ETCD_CAFILE OVERLAYD_ETCD_CERTFILE OVERLAYD_ETCD_KEYFILE; do
        if [ -n "${!name:-}" ] && [ ! -r "${!name}" ]; then
            echo "bootstrap.sh install: $name=${!name} is not a readable file" >&2
            exit 1
        fi
    done
    install_overlayd_package
    ln -sf /opt/overlayd/bin/overlayd /usr/local/bin/overlayd
    ln -sf /opt/overlayd/bin/overlayctl /usr/local/bin/overlayctl
    install -d /opt/cni/bin /etc/overlayd /etc/cni/net.d
    ln -sf /opt/overlayd/bin/overlay-cni /opt/cni/bin/overlay-cni
    if [ ! -f /etc/cni/net.d/10-overlay.conflist ]; then
        install -m 0644 "$here/config/overlay.conflist" /etc/cni/net.d/10-overlay.conflist
        say "wrote /etc/cni/net.d/10-overlay.conflist (podman run --network overlay ...)"
    fi
    if [ ! -f /etc/overlayd/overlayd.toml ]; then
        /opt/overlayd/bin/python - "$here/config/overlayd.toml" /etc/overlayd/overlayd.toml <<'PY'
import json, os, re, sys
text = open(sys.argv[1]).read()
endpoints = os.environ.get("OVERLAYD_ETCD_ENDPOINTS")
if endpoints:
    quoted = ", ".join(f'"{e.strip()}"' for e in endpoints.split(","))
    text = text.replace('etcd-endpoints = ["http://127.0.0.1:2379"]', f"etcd-endpoints = [{quoted}]")
# The TLS files, as given (bootstrap.sh install-etcd prints them), in place
# of the template's commented-out lines.
for name in ("etcd-cafile", "etcd-certfile", "etcd-keyfile"):
    value = os.environ.get("OVERLAYD_" + name.upper().replace("-", "_"))
    if value:
        line = f"{name} = {json.dumps(value)}"
        text, found = re.subn(rf"^# {name} = .*$", line, text, count=1, flags=re.M)
        text += "" if found else line + "\n"
if os.environ.get("OVERLAYD_IFACE"):
    text = text.replace('# iface = "eth0"', f'iface = "{os.environ["OVERLAYD_IFACE"]}"')
if os.environ.get("OVERLAYD_EGRESS"):
    text += f'egress = "{os.environ["OVERLAYD_EGRESS"]}"\n'
open(sys.argv[2], "w").write(text)
PY
        say "wrote /etc/overlayd/overlayd.toml"
    fi
    install -m 0644 "$here/systemd/overlayd.service" /etc/systemd/system/overlayd.service
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable --now overlayd.service
        say "overlayd is running: 'overlayctl status' shows it"
    else
        say "systemd is not running here: start overlayd by hand (overlayd --config /etc/overlayd/overlayd.toml)"
    fi
}

install_etcd() {
    local address=$1
    shift
    local clients=("$@")
    [ ${#clients[@]} -gt 0 ] || clients=("$(hostname)")
    if [ ! -d /run/systemd/system ]; then
        echo "bootstrap.sh install-etcd: needs systemd to run etcd as a service" >&2
        exit 1
    fi
    say "installing etcd on https://$address:2379"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends etcd-server etcd-client python3 \
        python3-venv >/dev/null
    # The certificates are made by overlayd's own PKI module (the Python
    # cryptography package), so overlayd is installed first.
    install_overlayd_package
    local pki=${OVERLAYD_PKI_DIR:-/etc/overlayd/pki}
    pki_tool() { /opt/overlayd/bin/python -m overlayd.lab.pki "$pki" "$@"; }
    pki_tool server etcd-server --ip "$address" --ip 127.0.0.1
    pki_tool client root
    local client
    for client in "${clients[@]}"; do
        pki_tool client "$client"
    done
    # etcd runs as user etcd and cannot enter root's 0700 directory: it gets
    # its own copies of the CA certificate and its key pair.
    install -d -o etcd -g etcd -m 0700 /etc/etcd/pki
    install -o etcd -g etcd -m 0644 "$pki/ca.pem" /etc/etcd/pki/ca.pem
    install -o etcd -g etcd -m 0644 "$pki/etcd-server.pem" /etc/etcd/pki/server.pem
    install -o etcd -g etcd -m 0600 "$pki/etcd-server-key.pem" /etc/etcd/pki/server-key.pem
    # Client URLs only: the peer URL stays Debian's default, localhost, as a
    # single member has no peers to reach.
    cat >/etc/default/etcd <<ENV
ETCD_NAME=overlayd
ETCD_LISTEN_CLIENT_URLS=https://$address:2379,https://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=https://$address:2379
ETCD_CERT_FILE=/etc/etcd/pki/server.pem
ETCD_KEY_FILE=/etc/etcd/pki/server-key.pem
ETCD_TRUSTED_CA_FILE=/etc/etcd/pki/ca.pem
ETCD_CLIENT_CERT_AUTH=true
ENV
    systemctl restart etcd
    local admin=(etcdctl --endpoints "https://127.0.0.1:2379" --cacert "$pki/ca.pem"
        --cert "$pki/root.pem" --key "$pki/root-key.pem")
    for _ in $(seq 50); do
        "${admin[@]}" endpoint health >/dev/null 2>&1 && break
        sleep 0.2
    done
    if [ -z "$("${admin[@]}" get /coreos.com/network/config --print-value-only)" ]; then
        "${admin[@]}" put /coreos.com/network/config "$(cat "$here/config/network.json")" >/dev/null
        say "wrote the network config from config/network.json"
    fi
    say "etcd wants a client certificate from everyone; the files are in $pki:"
    printf '    %-16s %s (its key %s stays here)\n' CA "$pki/ca.pem" "$pki/ca-key.pem"
    printf '    %-16s %s, %s\n' "admin (CN root)" "$pki/root.pem" "$pki/root-key.pem"
    for client in "${clients[@]}"; do
        printf '    %-16s %s, %s\n' "$client" "$pki/$client.pem" "$pki/$client-key.pem"
    done
    echo "  Copy ca.pem and a host's pair to that host (more: /opt/overlayd/bin/python -m"
    echo "  overlayd.lab.pki $pki client NAME), then on it:"
    echo "    OVERLAYD_ETCD_ENDPOINTS=https://$address:2379 OVERLAYD_ETCD_CAFILE=$pki/ca.pem \\"
    echo "    OVERLAYD_ETCD_CERTFILE=$pki/${clients[0]}.pem OVERLAYD_ETCD_KEYFILE=$pki/${clients[0]}-key.pem \\"
    echo "    ./bootstrap.sh install"
}

install_python_packages() {
    local stamp="$venv/.installed"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    say "installing overlayd and its Python dependencies into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e ".[test]"
    echo "$want" >"$stamp"
}

case "${1:-}" in
lab)
    install_system_packages
    install_python_packages
    load_bridge_netfilter
    "$venv/bin/overlayctl" lab down --name lab >/dev/null
    say "bringing up a ${HOSTS:-3}-host lab"
    status=0
    "$venv/bin/overlayctl" lab up --name lab --hosts "${HOSTS:-3}" --check || status=$?
    if [ "$status" = 0 ]; then
        # Real engines on the lab: a web server in a Podman container on h2
        # answers a client in a Docker container on h1 (skipped, with a
        # word, where the engines are missing or the lab has one host).
        "$venv/bin/overlayctl" lab demo --name lab || status=$?
    fi
    if [ "${LAB_KEEP:-1}" = 0 ]; then
        "$venv/bin/overlayctl" lab down --name lab
    else
        echo "The lab stays up: '$venv/bin/overlayctl lab status' shows it,"
        echo "'ip netns exec ovl-lab-h1c1 ping <address>' uses it,"
        echo "'$venv/bin/overlayctl lab down' removes it."
    fi
    exit $status
    ;;
test)
    install_system_packages
    install_python_packages
    load_bridge_netfilter
    say "ruff"
    "$venv/bin/ruff" check overlayd tests
    "$venv/bin/ruff" format --check overlayd tests
    say "mypy --strict"
    "$venv/bin/mypy"
    say "pytest"
    exec "$venv/bin/python" -m pytest -ra tests
    ;;
install)
    install_host
    ;;
install-etcd)
    install_etcd "${2:?usage: $0 install-etcd IP [CLIENT...]}" "${@:3}"
    ;;
*)
    echo "usage: $0 lab|test|install|install-etcd IP [CLIENT...]" >&2
    exit 2
    ;;
esac
