"""`overlayctl docker-opts`: Docker daemon options that put Docker on
overlayd's bridge, subnet and MTU, as flannel's mk-docker-opts.sh does.

Unlike flannel's, `--fixed-cidr` is the upper half of the host's subnet,
not all of it: overlay-cni's host-local (Podman, any CNI runtime, and
overlayd's Docker plugin) hands out the lower half, so two allocators that
keep separate books never give one address twice (plan/ipam.py)."""

from __future__ import annotations

import argparse
import json
import sys
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from overlayd.errors import OverlaydError
from overlayd.plan.ipam import container_ranges
from overlayd.surfaces.subnetfile import read_variables


def docker_options(subnet_file: Path) -> dict[str, Any]:
    """Docker on overlayd's bridge: what flannel's mk-docker-opts.sh derives
    from the subnet file, for a bridge overlayd already made."""
    found = read_variables(subnet_file)
    subnet_text = found.get("FLANNEL_SUBNET")
    if not subnet_text or not found.get("FLANNEL_MTU"):
        raise OverlaydError(f"{subnet_file} has no FLANNEL_SUBNET/FLANNEL_MTU: is overlayd ready?")
    gateway = subnet_text.split("/")[0]
    subnet = IPv4Network(subnet_text, strict=False)
    egress = found.get("OVERLAYD_EGRESS", "masquerade")
    try:
        fixed_cidr = container_ranges(subnet).docker_fixed_cidr
    except ValueError as exc:
        raise OverlaydError(f"docker-opts: {exc}") from exc
    return {
        "bridge": found.get("OVERLAYD_BRIDGE", "ovl0"),
        "subnet": str(subnet),
        "fixed_cidr": str(fixed_cidr),
        "gateway": gateway,
        "mtu": int(found["FLANNEL_MTU"]),
        # overlayd masquerades (or egress is off); Docker must not NAT too,
        # or container-to-container traffic across hosts would be NATed.
        "ip_masq": False,
        "egress": egress,
    }


def cmd_docker_opts(args: argparse.Namespace) -> int:
    o = docker_options(Path(args.subnet_file))
    if o["egress"] == "gwbridge":
        print(
            "overlayctl: warning: egress=gwbridge gives containers their way out through a"
            " second interface, which Docker's bridge driver does not add: run overlayd with"
            " egress=masquerade on Docker hosts, or use overlayd's Docker network plugin"
            " (docker-plugin = true), with which Docker adds its docker_gwbridge",
            file=sys.stderr,
        )
    if args.format == "daemon-json":
        text = json.dumps(
            {
                "bridge": o["bridge"],
                "fixed-cidr": o["fixed_cidr"],
                "mtu": o["mtu"],
                "ip-masq": False,
            },
            indent=2,
        )
    elif args.format == "network-create":
        text = (
            f"docker network create --driver bridge --subnet {o['subnet']} --gateway"
            f" {o['gateway']} --ip-range {o['fixed_cidr']}"
            f" -o com.docker.network.bridge.name={o['bridge']}"
            f" -o com.docker.network.driver.mtu={o['mtu']}"
            " -o com.docker.network.bridge.enable_ip_masquerade=false overlay"
        )
    else:
        opts = f"--bridge={o['bridge']} --fixed-cidr={o['fixed_cidr']}"
        opts += f" --mtu={o['mtu']} --ip-masq=false"
        text = (
            f"DOCKER_OPT_BIP=\nDOCKER_OPT_BRIDGE=--bridge={o['bridge']}\n"
            f"DOCKER_OPT_FIXED_CIDR=--fixed-cidr={o['fixed_cidr']}\n"
            f"DOCKER_OPT_MTU=--mtu={o['mtu']}\nDOCKER_OPT_IPMASQ=--ip-masq=false\n"
            f'{args.key}="{opts}"'
        )
    if args.json:  # the derived options themselves, for scripts
        print(json.dumps(o, indent=2))
    elif args.out == "-":
        print(text)
    else:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}")
    return 0
