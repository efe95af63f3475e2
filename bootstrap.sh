#!/usr/bin/env bash
# One-command set-up for a fresh Debian 12 machine, run as root:
#   ./bootstrap.sh lab    install what is needed, bring up a 3-host lab, check it
#   ./bootstrap.sh test   install what is needed, run linters and the whole test suite
# Environment: HOSTS (lab size, default 3), LAB_KEEP=0 (remove the lab after
# its check; by default it stays up to be explored).
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
    for cmd in etcd etcdctl ip bridge ping tcpdump nft iptables ss sysctl iperf3 sockperf; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    say "installing Debian packages (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        python3 python3-venv python3-pip etcd-server etcd-client iproute2 \
        iputils-ping tcpdump nftables iptables procps iperf3 sockperf >/dev/null
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
    "$venv/bin/overlayctl" lab down --name lab >/dev/null
    say "bringing up a ${HOSTS:-3}-host lab"
    status=0
    "$venv/bin/overlayctl" lab up --name lab --hosts "${HOSTS:-3}" --check || status=$?
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
    say "ruff"
    "$venv/bin/ruff" check overlayd tests
    "$venv/bin/ruff" format --check overlayd tests
    say "mypy --strict"
    "$venv/bin/mypy"
    say "pytest"
    exec "$venv/bin/python" -m pytest -ra tests
    ;;
*)
    echo "usage: $0 lab|test" >&2
    exit 2
    ;;
esac
