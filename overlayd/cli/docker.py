"""`overlayctl docker-opts`: Docker daemon options that put Docker on
overlayd's bridge, subnet and MTU, as flannel's mk-docker-opts.sh does.

Unlike flannel's, `--fixed-cidr` is the upper half of the host's subnet,
not all of it: overlay-cni's host-local (Podman, any CNI runtime, and
overlayd's Docker plugin) hands out the lower half, so two allocators that
keep separate books never give one address twice (plan/ipam.py).

In a dual-stack network (FLANNEL_IPV6_SUBNET in the subnet file) Docker
gets the lower half of the IPv6 subnet and host-local the upper one
(plan/ipam.ContainerRanges says why). dockerd 20.10's flags are
`--ipv6 --fixed-cidr-v6=<the whole IPv6 subnet>` (daemon.json `ipv6`,
`fixed-cidr-v6`): Docker then keeps overlayd's IPv6 gateway on the bridge
and gives containers the subnet's prefix, with addresses made from their
MACs in the subnet's lowest /80. An IPv6 subnet longer than /79 leaves no
room for that: those two forms are refused, and the network-create form
(`--ipv6 --subnet <IPv6 subnet> --gateway <the bridge's IPv6 address>
--ip-range <the lower half>`) is the way."""

from __future__ import annotations

import argparse
import json
import sys
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

from overlayd.errors import OverlaydError
from overlayd.model import IPV4, IPV6, Family
from overlayd.plan.ipam import container_ranges
from overlayd.surfaces.subnetfile import read_variables


def _family_options(found: dict[str, str], variable: str, family: Family) -> dict[str, Any]:
    """One family's subnet, Docker's part of it (`fixed_cidr` for dockerd,
    `ip_range` for a network) and the bridge's address, from `variable`
    (gateway/len); all None when it is absent."""
    suffix = "" if family == IPV4 else "6"
    keys = [f"{key}{suffix}" for key in ("subnet", "fixed_cidr", "ip_range", "gateway")]
    text = found.get(variable)
    if not text:
        return dict.fromkeys(keys)
    try:
        gateway = ip_interface(text)
        if gateway.version != family.version:
            raise ValueError(f"{text!r} is not an IPv{family.version} address/length")
        ranges = container_ranges(gateway.network)
    except ValueError as exc:
        raise OverlaydError(f"docker-opts: {variable}: {exc}") from exc
    values = (gateway.network, ranges.docker_fixed_cidr, ranges.docker_ip_range, gateway.ip)
    return {
        key: None if value is None else str(value) for key, value in zip(keys, values, strict=True)
    }


def docker_options(subnet_file: Path) -> dict[str, Any]:
    """Docker on overlayd's bridge: what flannel's mk-docker-opts.sh derives
    from the subnet file, for a bridge overlayd already made; the IPv6 keys
    (`subnet6`, `fixed_cidr6`, `gateway6`) are None in an IPv4-only network."""
    found = read_variables(subnet_file)
    if not found.get("FLANNEL_SUBNET") or not found.get("FLANNEL_MTU"):
        raise OverlaydError(f"{subnet_file} has no FLANNEL_SUBNET/FLANNEL_MTU: is overlayd ready?")
    return {
        "bridge": found.get("OVERLAYD_BRIDGE", "ovl0"),
        **_family_options(found, "FLANNEL_SUBNET", IPV4),
        **_family_options(found, "FLANNEL_IPV6_SUBNET", IPV6),
        "mtu": int(found["FLANNEL_MTU"]),
        # overlayd masquerades (or egress is off); Docker must not NAT too,
        # or container-to-container traffic across hosts would be NATed.
        "ip_masq": False,
        "egress": found.get("OVERLAYD_EGRESS", "masquerade"),
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
    dual = o["subnet6"] is not None
    if dual and o["fixed_cidr6"] is None and args.format != "network-create" and not args.json:
        raise OverlaydError(
            f"docker-opts: the IPv6 subnet {o['subnet6']} is longer than /79: dockerd's"
            " default bridge would take IPv6 addresses all over it (from the containers'"
            " MACs); use --format network-create"
        )
    if args.format == "daemon-json":
        settings: dict[str, Any] = {
            "bridge": o["bridge"],
            "fixed-cidr": o["fixed_cidr"],
            "mtu": o["mtu"],
            "ip-masq": False,
        }
        if dual:
            settings |= {"ipv6": True, "fixed-cidr-v6": o["fixed_cidr6"]}
        text = json.dumps(settings, indent=2)
    elif args.format == "network-create":
        ipv6 = (
            f" --ipv6 --subnet {o['subnet6']} --gateway {o['gateway6']} --ip-range {o['ip_range6']}"
            if dual
            else ""
        )
        text = (
            f"docker network create --driver bridge --subnet {o['subnet']} --gateway"
            f" {o['gateway']} --ip-range {o['ip_range']}{ipv6}"
            f" -o com.docker.network.bridge.name={o['bridge']}"
            f" -o com.docker.network.driver.mtu={o['mtu']}"
            " -o com.docker.network.bridge.enable_ip_masquerade=false overlay"
        )
    else:
        ipv6 = f"--ipv6 --fixed-cidr-v6={o['fixed_cidr6']}" if dual else ""
        opts = f"--bridge={o['bridge']} --fixed-cidr={o['fixed_cidr']}"
        opts += f" --mtu={o['mtu']} --ip-masq=false"
        opts += f" {ipv6}" if ipv6 else ""
        text = (
            f"DOCKER_OPT_BIP=\nDOCKER_OPT_BRIDGE=--bridge={o['bridge']}\n"
            f"DOCKER_OPT_FIXED_CIDR=--fixed-cidr={o['fixed_cidr']}\n"
            f"DOCKER_OPT_MTU=--mtu={o['mtu']}\nDOCKER_OPT_IPMASQ=--ip-masq=false\n"
            + (f'DOCKER_OPT_IPV6="{ipv6}"\n' if ipv6 else "")
            + f'{args.key}="{opts}"'
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
