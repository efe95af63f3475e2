"""Questions for a lab host's DNS responder, asked from inside the host's
namespace (where its gateway addresses are), the way `overlayctl
diagnose` asks them (cli/diagnose_services.ask_all: paced under the
responder's rate limit) and judged the same way
(plan/service_check.dns_differences):

    python -m overlayd.lab.dnsask SERVER < questions.json

reads a JSON list of {"name", "rdtype", "expected": [values] or null
(NXDOMAIN), "about"} and prints a JSON list of the differences (empty:
every answer as expected). `lab svcchurn` uses it to ask for the names of
the containers it removed (which must be gone) beside its anchors' (which
must be there)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from overlayd.cli.diagnose_services import ask_all
from overlayd.lab import netns
from overlayd.plan.service_check import DnsQuestion, dns_differences


def to_json(questions: Sequence[DnsQuestion]) -> str:
    return json.dumps(
        [
            {
                "name": q.name,
                "rdtype": q.rdtype,
                "expected": None if q.expected is None else sorted(q.expected),
                "about": q.about,
            }
            for q in questions
        ]
    )


def from_json(text: str) -> list[DnsQuestion]:
    raw: list[dict[str, Any]] = json.loads(text)
    return [
        DnsQuestion(
            str(q["name"]),
            str(q["rdtype"]),
            None if q["expected"] is None else frozenset(map(str, q["expected"])),
            str(q["about"]),
        )
        for q in raw
    ]


def ask_in(ns: str, server: str, questions: Sequence[DnsQuestion]) -> list[str]:
    """The differences the responder at `server`, asked from namespace
    `ns`, shows against `questions`' expected answers."""
    done = subprocess.run(
        netns.module_argv(ns, "overlayd.lab.dnsask", server),
        input=to_json(questions),
        capture_output=True,
        text=True,
        timeout=60 + len(questions) / 50,
        check=False,
    )
    if done.returncode != 0:
        raise netns.LabCommandError(f"dnsask {server} in {ns}: {done.stderr.strip()[-500:]}")
    found: list[str] = json.loads(done.stdout)
    return found


def main(argv: Sequence[str]) -> int:
    (server,) = argv
    questions = from_json(sys.stdin.read())
    answers = asyncio.run(ask_all(server, questions))
    print(json.dumps(dns_differences(server, questions, answers)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
