"""Name lookups from inside a lab container, through the resolv.conf the
container was given (run with `ip netns exec`, which shows the commands it
runs /etc/netns/<ns>/resolv.conf as /etc/resolv.conf), for the services lab
test:

    python -m tests.lab.svc_dns resolve NAME...
        the system resolver (getaddrinfo, IPv4, search domains and ndots
        as resolv.conf says): a JSON object NAME -> sorted addresses, or
        "error: <gai error>"
    python -m tests.lab.svc_dns resolve6 NAME...
        the same for IPv6 (AAAA records)
    python -m tests.lab.svc_dns query NAME TYPE
        one query to resolv.conf's first nameserver (dnspython): a JSON
        object with the nameserver, the search list, the rcode's name and
        the answer's addresses
    python -m tests.lab.svc_dns watch NAME ADDRESS SECONDS
        queries NAME (A) every WATCH_STEP seconds until ADDRESS is not in
        the answer, then prints {"gone_at": time.monotonic()} (the clock is
        the machine's, so the test compares it with its own); prints
        {"gone_at": null} after SECONDS. Prints "ready" first, once it has
        seen ADDRESS in the answer.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.resolver

WATCH_STEP = 0.05


def resolve(names: list[str], family: socket.AddressFamily = socket.AF_INET) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            found[name] = f"error: {exc}"
            continue
        found[name] = sorted({str(info[4][0]) for info in infos})
    return found


def query(name: str, rdtype: str) -> dict[str, Any]:
    resolver = dns.resolver.Resolver(configure=True)
    server = resolver.nameservers[0]
    answer = dns.query.udp(dns.message.make_query(name, rdtype), str(server), timeout=2.0)
    return {
        "nameserver": str(server),
        "search": [str(s) for s in resolver.search],
        "rcode": dns.rcode.to_text(answer.rcode()),
        "answers": sorted(item.to_text() for rrset in answer.answer for item in rrset),
    }


def watch(name: str, address: str, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    ready = False
    while time.monotonic() < deadline:
        try:
            held = address in query(name, "A")["answers"]
        except dns.exception.Timeout:
            # No answer says nothing either way: ask again.
            time.sleep(WATCH_STEP)
            continue
        if held and not ready:
            print("ready", flush=True)
            ready = True
        elif not held and ready:
            return {"gone_at": time.monotonic()}
        time.sleep(WATCH_STEP)
    return {"gone_at": None, "ready": ready}


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "resolve":
        print(json.dumps(resolve(argv[1:])))
        return 0
    if len(argv) >= 2 and argv[0] == "resolve6":
        print(json.dumps(resolve(argv[1:], socket.AF_INET6)))
        return 0
    if len(argv) == 3 and argv[0] == "query":
        print(json.dumps(query(argv[1], argv[2])))
        return 0
    if len(argv) == 4 and argv[0] == "watch":
        print(json.dumps(watch(argv[1], argv[2], float(argv[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
