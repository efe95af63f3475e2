"""Network policy documents in, validated `Policy` values out, and the
verdict for one packet: the pure core that `overlayctl policy apply/check`
and the daemon share.

Documents come in two shapes, as JSON or YAML (read with `yaml.safe_load`'s
rules):

  ours:        {"name", "selector", "policyTypes", "ingress": [{"from", "ports"}],
                "egress": [{"to", "ports"}]}, peers {"selector"} or {"ipBlock"}
  Kubernetes:  a networking.k8s.io/v1 NetworkPolicy ({"apiVersion", "kind",
               "metadata": {"name"}, "spec": {"podSelector", ...}}), peers
               {"podSelector"} or {"ipBlock"}

with Kubernetes' semantics: policyTypes defaults to Ingress, plus Egress when
`egress` has rules; a missing or empty `from`/`to` means every peer and a
missing or empty `ports` every port; `ingress: []` with Ingress in
policyTypes allows no ingress; the empty selector `{}` selects every
endpoint; a port without a protocol is TCP.

Refused, each with the path of the field at fault leading the message (a
typo must never silently widen a policy):
- unknown fields anywhere in the policy (metadata's informational fields -
  labels, annotations, uid and the like - and a top-level `status` of a
  Kubernetes document are ignored);
- namespaces: `namespaceSelector` (alone or with `podSelector`) and
  `metadata.namespace` (overlayd has no namespaces: a policy applies to
  every endpoint its selector selects; select on the label
  `k8s.pod.namespace` that CNI registrations from Kubernetes carry);
- named ports (strings): there are no pod specs to resolve them against;
- rules for a direction policyTypes leaves out (Kubernetes ignores them,
  which leaves the direction open while the author thinks it is filtered);
- a missing selector (`{}` says "every endpoint" explicitly);
- ipBlock CIDRs with host bits set (the message names the network meant),
  bare addresses, and `except` entries that are not strict subnets of the
  cidr in its family (Kubernetes' rule: an except equal to the cidr, which
  would empty the block, is refused too; overlapping excepts are fine);
- YAML aliases and anchors (`*name`: they let a small document expand into
  a huge one) and duplicate keys (JSON and YAML both keep the last one
  silently).

Limits: a document of at most 1 MiB (before parsing, and for the canonical
form that `render_policy` writes to etcd), at most 100 rules per direction,
1,000 peers per rule, 10,000 `ports` entries per rule and 1,000 `except`
entries per ipBlock. policyTypes holds at most 2 entries (Kubernetes' rule).

Label keys and values follow Kubernetes' syntax; `label_key_problem` and
`label_value_problem` are shared with endpoint registrations
(plan/endpoints.py).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any, NoReturn

from overlayd.errors import PolicyError
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan.policy_model import (
    Direction,
    Endpoint,
    IpBlock,
    LabelSelector,
    Operator,
    Policy,
    PolicyPeer,
    PortRange,
    Protocol,
    Requirement,
    Rule,
    SelectorPeer,
)

MAX_POLICY_BYTES = 1 << 20
MAX_RULES = 100  # per direction
MAX_PEERS = 1000  # per rule
MAX_PORTS = 10_000  # per rule
MAX_EXCEPTS = 1000  # per ipBlock

KUBERNETES_API_VERSION = "networking.k8s.io/v1"

# DNS-1123 label: a policy's name (and so the last segment of its etcd key).
_NAME_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
# Kubernetes' "qualified name" part of a label key, and a non-empty value.
_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")
# DNS-1123 subdomain: a label key's optional prefix.
_SUBDOMAIN_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
# An address/prefix as people write it: no scope ids, no spaces, no netmasks,
# no leading zeros in the prefix length.
_CIDR_RE = re.compile(r"[0-9A-Fa-f:.]+/(?:0|[1-9][0-9]{0,2})")
_FIELD_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

_PROTOCOLS = {protocol.value: protocol for protocol in Protocol}
_OPERATORS = {operator.value: operator for operator in Operator}
_DIRECTIONS = {direction.value: direction for direction in Direction}
_PEERS_FIELD = {Direction.INGRESS: "from", Direction.EGRESS: "to"}
_RULES_FIELD = {Direction.INGRESS: "ingress", Direction.EGRESS: "egress"}
_BOTH = (Direction.INGRESS, Direction.EGRESS)

_NO_NAMESPACES = (
    "overlayd has no namespaces: a policy applies to every endpoint its selector"
    " selects; select endpoints by label instead (registrations from Kubernetes"
    " carry the label k8s.pod.namespace)"
)


# --- labels (shared with plan/endpoints.py) ------------------------------------


def show(value: object, limit: int = 80) -> str:
    """A value for an error message: JSON-quoted and ASCII-escaped, so that
    odd characters cannot disguise themselves in a terminal or a log line,
    and cut short."""
    try:
        text = json.dumps(value, ensure_ascii=True, default=str)
    except ValueError:  # a circular structure handed in as a Mapping
        text = repr(type(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def label_key_problem(key: object) -> str | None:
    """None for a valid label key (an optional DNS-subdomain prefix and "/",
    then a name of at most 63 characters: alphanumerics, '-', '_' and '.',
    alphanumeric at both ends), otherwise what is wrong, naming the key."""
    if not isinstance(key, str):
        return f"label key {show(key)} is not a string"
    parts = key.split("/")
    if len(parts) > 2:
        return f"label key {show(key)} has more than one '/'"
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            return f"label key {show(key)} has an empty prefix before '/'"
        if len(prefix) > 253 or not _SUBDOMAIN_RE.fullmatch(prefix):
            return (
                f"label key {show(key)}: the prefix must be a DNS subdomain (lower-case"
                " alphanumerics, '-' and '.', at most 253 characters)"
            )
    if not name:
        return f"label key {show(key)} has an empty name"
    if len(name) > 63:
        return f"label key {show(key)}: the name is longer than 63 characters"
    if not _LABEL_NAME_RE.fullmatch(name):
        return (
            f"label key {show(key)}: the name must be alphanumerics, '-', '_' or '.',"
            " starting and ending with an alphanumeric"
        )
    return None


def label_value_problem(value: object) -> str | None:
    """None for a valid label value (empty, or at most 63 characters:
    alphanumerics, '-', '_' and '.', alphanumeric at both ends), otherwise
    what is wrong, naming the value."""
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, bool | int | float) else ""
        return f"label value {show(value)} is {kind_of(value)}, not a string{hint}"
    if not value:
        return None
    if len(value) > 63:
        return f"label value {show(value)} is longer than 63 characters"
    if not _LABEL_NAME_RE.fullmatch(value):
        return (
            f"label value {show(value)} must be alphanumerics, '-', '_' or '.',"
            " starting and ending with an alphanumeric"
        )
    return None


def name_problem(name: object) -> str | None:
    """None for a valid policy name (a DNS-1123 label: at most 63
    lower-case alphanumerics and '-', alphanumeric at both ends)."""
    if not isinstance(name, str):
        return f"{show(name)} is {kind_of(name)}, not a string"
    if not name:
        return "is empty"
    if len(name) > 63:
        return f"{show(name)} is longer than 63 characters"
    if not _NAME_RE.fullmatch(name):
        return (
            f"{show(name)} is not a DNS-1123 label (lower-case alphanumerics and '-',"
            " starting and ending with an alphanumeric)"
        )
    return None


# --- reading the text ------------------------------------------------------------


class _DuplicateKey(ValueError):
    pass


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


@functools.cache
def _yaml_loader() -> type[Any]:
    """The YAML loader, its module imported on first use: the daemon reads
    only canonical JSON from etcd, and PyYAML took 10 ms of its start."""
    import yaml

    try:  # libyaml's parser when PyYAML was built with it (its wheels are)
        from yaml import CSafeLoader as SafeLoader
    except ImportError:  # pragma: no cover - a PyYAML without libyaml
        from yaml import SafeLoader  # type: ignore[assignment]

    class Loader(SafeLoader):
        """safe_load's rules, minus aliases (a document of a few kilobytes could
        otherwise stand for millions of peers) and duplicate keys."""

        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            # Without aliases every node is constructed exactly once; meeting
            # one again means it was referred to by an alias (or a merge key).
            if node in self.constructed_objects:
                raise yaml.constructor.ConstructorError(
                    None, None, "YAML aliases (*name) are not accepted", node.start_mark
                )
            return super().construct_object(node, deep)

        def construct_mapping(
            self, node: yaml.MappingNode, deep: bool = False
        ) -> dict[Hashable, Any]:
            seen: set[object] = set()
            for key_node, _ in node.value:
                ident = (
                    (key_node.tag, key_node.value)
                    if isinstance(key_node, yaml.ScalarNode)
                    else id(key_node)
                )
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found the key {show(key_node.value)} twice",
                        key_node.start_mark,
                    )
                seen.add(ident)
            return super().construct_mapping(node, deep)

    return Loader


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_document(document: str | bytes | bytearray) -> Any:
    """The document's data, JSON tried first (faster, and its own error
    messages for a document that looks like JSON), YAML otherwise."""
    if len(document) > MAX_POLICY_BYTES:
        raise PolicyError("document", f"larger than {MAX_POLICY_BYTES} bytes")
    if isinstance(document, bytes | bytearray):
        try:
            text = bytes(document).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PolicyError("document", f"not UTF-8 text: {exc}") from exc
    else:
        text = document.removeprefix("\ufeff")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise PolicyError("document", f"larger than {MAX_POLICY_BYTES} bytes")
    looks_like_json = text.lstrip()[:1] == "{"
    json_error = ""
    try:
        return json.loads(text, object_pairs_hook=_json_pairs)
    except _DuplicateKey as exc:
        raise PolicyError("document", f"the key {show(exc.args[0])} is given twice") from exc
    except RecursionError as exc:
        raise PolicyError("document", "nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and too many digits in a number
        json_error = str(exc)
    import yaml

    try:
        # A SafeLoader: no arbitrary objects.
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as exc:
        if looks_like_json:
            raise PolicyError("document", f"not valid JSON: {json_error}") from exc
        raise PolicyError("document", f"not valid YAML: {_one_line(str(exc))}") from exc
    except (RecursionError, ValueError) as exc:
        raise PolicyError("document", f"not valid YAML: {exc}") from exc


# --- structure helpers ----------------------------------------------------------
# Public because plan/service.py reads its documents with the same rules
# (load_document, the path-naming refusals, selectors, port numbers).


def fail(path: str, reason: str) -> NoReturn:
    raise PolicyError(path or "document", reason)


def join_path(path: str, name: str) -> str:
    shown = name if _FIELD_RE.fullmatch(name) else show(name, 40)
    return f"{path}.{shown}" if path else shown


def as_object(raw: object, path: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        fail(path, f"must be an object, not {kind_of(raw)}")
    for key in raw:
        if not isinstance(key, str):
            fail(path, f"the key {show(key)} is not a string")
    return raw


def check_known(obj: Mapping[str, Any], path: str, known: Iterable[str], hint: str = "") -> None:
    unknown = obj.keys() - set(known)
    if unknown:
        field = min(unknown)
        fail(
            join_path(path, field),
            f"unknown field (expected {', '.join(sorted(known))}){hint}",
        )


def as_list(raw: object, path: str, limit: int) -> Sequence[Any]:
    """A list field; absent or null is empty, as Kubernetes reads it."""
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        fail(path, f"must be a list, not {kind_of(raw)}")
    if len(raw) > limit:
        fail(path, f"{len(raw)} entries, more than the limit of {limit}")
    return raw


# --- selectors, peers, ports -------------------------------------------------------


def parse_selector(raw: object, path: str) -> LabelSelector:
    obj = as_object(raw, path)
    check_known(obj, path, ("matchLabels", "matchExpressions"))
    labels_path = join_path(path, "matchLabels")
    labels = as_object(obj.get("matchLabels") or {}, labels_path)
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(value)
        if problem:
            fail(labels_path, problem)
    expressions_path = join_path(path, "matchExpressions")
    requirements = [
        _requirement(item, f"{expressions_path}[{index}]")
        for index, item in enumerate(as_list(obj.get("matchExpressions"), expressions_path, 1000))
    ]
    requirements.sort(key=lambda r: (r.key, r.operator.value, sorted(r.values)))
    return LabelSelector(tuple(sorted(labels.items())), tuple(requirements))


def _requirement(raw: object, path: str) -> Requirement:
    obj = as_object(raw, path)
    check_known(obj, path, ("key", "operator", "values"))
    key = obj.get("key")
    if key is None:
        fail(join_path(path, "key"), "required")
    problem = label_key_problem(key)
    if problem:
        fail(join_path(path, "key"), problem)
    operator_raw = obj.get("operator")
    operator = _OPERATORS.get(operator_raw) if isinstance(operator_raw, str) else None
    if operator is None:
        given = "required" if operator_raw is None else f"{show(operator_raw)} is not"
        fail(join_path(path, "operator"), f"{given} one of In, NotIn, Exists, DoesNotExist")
    values_path = join_path(path, "values")
    values = as_list(obj.get("values"), values_path, 1000)
    if operator in (Operator.IN, Operator.NOT_IN) and not values:
        fail(values_path, f"{operator.value} needs at least one value")
    if operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and values:
        fail(values_path, f"{operator.value} takes no values")
    for index, value in enumerate(values):
        problem = label_value_problem(value)
        if problem:
            fail(f"{values_path}[{index}]", problem)
    return Requirement(str(key), operator, frozenset(values))


def _network(raw: object, path: str) -> IPNetwork:
    if not isinstance(raw, str):
        fail(path, f"{show(raw)} is {kind_of(raw)}, not a CIDR string")
    if not _CIDR_RE.fullmatch(raw):
        fail(path, f"{show(raw)} is not a CIDR (an address and a prefix length: 10.0.0.0/8)")
    try:
        return ip_network(raw, strict=True)
    except ValueError as exc:
        try:
            meant = ip_network(raw, strict=False)
        except ValueError:
            fail(path, f"{show(raw)} is not a CIDR: {exc}")
        fail(path, f"{raw} has host bits set: the network is {meant}")


def _ip_block(raw: object, path: str) -> IpBlock:
    obj = as_object(raw, path)
    check_known(obj, path, ("cidr", "except"))
    if obj.get("cidr") is None:
        fail(join_path(path, "cidr"), "required")
    cidr = _network(obj["cidr"], join_path(path, "cidr"))
    excepts_path = join_path(path, "except")
    excepts: list[IPNetwork] = []
    for index, item in enumerate(as_list(obj.get("except"), excepts_path, MAX_EXCEPTS)):
        item_path = f"{excepts_path}[{index}]"
        block = _network(item, item_path)
        if block.version != cidr.version:
            fail(item_path, f"{block} is IPv{block.version}, the cidr {cidr} IPv{cidr.version}")
        # Kubernetes' rule: a strict subset of cidr (an except equal to the
        # cidr would leave a block that matches nothing).
        if not (block.prefixlen > cidr.prefixlen and block.network_address in cidr):
            fail(item_path, f"{block} is not a strict subnet of the cidr {cidr}")
        excepts.append(block)
    return IpBlock(cidr, tuple(excepts))


@dataclass(frozen=True, slots=True)
class _Dialect:
    """How one document shape spells what differs between the shapes."""

    selector: str  # the policy's own selector field
    peer_selector: str  # a peer's selector field
    peer_fields: tuple[str, ...]


_OURS = _Dialect("selector", "selector", ("ipBlock", "selector"))
_KUBERNETES = _Dialect(
    "podSelector", "podSelector", ("ipBlock", "namespaceSelector", "podSelector")
)


def _peer(raw: object, path: str, dialect: _Dialect) -> PolicyPeer:
    obj = as_object(raw, path)
    check_known(obj, path, dialect.peer_fields)
    if obj.get("namespaceSelector") is not None:
        fail(join_path(path, "namespaceSelector"), _NO_NAMESPACES)
    present = [name for name in dialect.peer_fields if obj.get(name) is not None]
    if not present:
        fail(path, f"a peer needs {dialect.peer_selector} or ipBlock")
    if len(present) > 1:
        fail(path, f"{dialect.peer_selector} and ipBlock exclude each other: write two peers")
    if present[0] == "ipBlock":
        return _ip_block(obj["ipBlock"], join_path(path, "ipBlock"))
    return SelectorPeer(
        parse_selector(obj[dialect.peer_selector], join_path(path, dialect.peer_selector))
    )


def port_number(raw: object, path: str) -> int:
    if isinstance(raw, str):
        hint = f"write {raw} without quotes" if raw.isdigit() else "write the number"
        fail(path, f"named ports ({show(raw)}) are not supported in overlayd: {hint}")
    if isinstance(raw, bool) or not isinstance(raw, int):
        fail(path, f"{show(raw)} is {kind_of(raw)}, not a port number")
    if not 1 <= raw <= 65535:
        fail(path, f"{raw} is not a port (1-65535)")
    return raw


def _port_range(raw: object, path: str) -> PortRange:
    obj = as_object(raw, path)
    check_known(obj, path, ("endPort", "port", "protocol"))
    protocol_raw = obj.get("protocol")
    if protocol_raw is None:
        protocol = Protocol.TCP
    else:
        found = _PROTOCOLS.get(protocol_raw) if isinstance(protocol_raw, str) else None
        if found is None:
            fail(join_path(path, "protocol"), f"{show(protocol_raw)} is not TCP, UDP or SCTP")
        protocol = found
    port_raw, end_raw = obj.get("port"), obj.get("endPort")
    if port_raw is None:
        if end_raw is not None:
            fail(join_path(path, "endPort"), "needs port (the first port of the range)")
        return PortRange(protocol)
    port = port_number(port_raw, join_path(path, "port"))
    if end_raw is None:
        return PortRange(protocol, port, port)
    end = port_number(end_raw, join_path(path, "endPort"))
    if end < port:
        fail(join_path(path, "endPort"), f"{end} is less than port {port}")
    return PortRange(protocol, port, end)


def _rule(raw: object, path: str, direction: Direction, dialect: _Dialect) -> Rule:
    obj = as_object(raw, path)
    peers_field = _PEERS_FIELD[direction]
    other = _PEERS_FIELD[Direction.EGRESS if direction is Direction.INGRESS else Direction.INGRESS]
    hint = (
        f"; {_RULES_FIELD[direction]} rules name their peers in {peers_field}"
        if other in obj
        else ""
    )
    check_known(obj, path, (peers_field, "ports"), hint)
    peers_path, ports_path = join_path(path, peers_field), join_path(path, "ports")
    peers = tuple(
        _peer(item, f"{peers_path}[{index}]", dialect)
        for index, item in enumerate(as_list(obj.get(peers_field), peers_path, MAX_PEERS))
    )
    ports = tuple(
        _port_range(item, f"{ports_path}[{index}]")
        for index, item in enumerate(as_list(obj.get("ports"), ports_path, MAX_PORTS))
    )
    return Rule(peers or None, ports or None)


# --- documents --------------------------------------------------------------------


def document_name(
    raw: object,
    path: str,
    given: str | None,
    *,
    kind: str,
    verb: str,
    problem_of: Callable[[object], str | None] = name_problem,
) -> str:
    """A document's name (`raw`, at `path`), checked by `problem_of`
    against the name it is given on the command line or by its key
    (`given`): either may be missing, not both, and they must agree. `kind`
    and `verb` word the refusals ("the name given for the policy ...", "...
    but it is applied as ...")."""
    if given is not None:
        problem = problem_of(given)
        if problem:
            fail(path, f"the name given for the {kind} {problem}")
    if raw is None:
        if given is None:
            fail(path, "required")
        return given
    problem = problem_of(raw)
    if problem:
        fail(path, problem)
    if given is not None and raw != given:
        fail(path, f"the document names {show(raw)}, but it is {verb} as {show(given)}")
    return str(raw)


def _policy_name(raw: object, path: str, given: str | None) -> str:
    return document_name(raw, path, given, kind="policy", verb="applied")


def _body(
    obj: Mapping[str, Any], path: str, name: str, selector: LabelSelector, dialect: _Dialect
) -> Policy:
    """policyTypes, ingress and egress: the part both shapes share."""
    types_path = join_path(path, "policyTypes")
    types_raw = as_list(obj.get("policyTypes"), types_path, 2)
    types: set[Direction] = set()
    for index, item in enumerate(types_raw):
        direction = _DIRECTIONS.get(item) if isinstance(item, str) else None
        if direction is None:
            fail(f"{types_path}[{index}]", f"{show(item)} is not Ingress or Egress")
        types.add(direction)
    rules: dict[Direction, tuple[Rule, ...]] = {}
    for direction in _BOTH:
        rules_path = join_path(path, _RULES_FIELD[direction])
        rules[direction] = tuple(
            _rule(item, f"{rules_path}[{index}]", direction, dialect)
            for index, item in enumerate(
                as_list(obj.get(_RULES_FIELD[direction]), rules_path, MAX_RULES)
            )
        )
    if not types:
        # Kubernetes' default: every policy isolates ingress; one with
        # egress rules isolates egress too.
        types = {Direction.INGRESS}
        if rules[Direction.EGRESS]:
            types.add(Direction.EGRESS)
    for direction in _BOTH:
        if rules[direction] and direction not in types:
            fail(
                join_path(path, _RULES_FIELD[direction]),
                f"policyTypes does not include {direction.value}, so these rules would be"
                f" ignored (and {direction.value.lower()} left open): add {direction.value}"
                " to policyTypes or remove them",
            )
    return Policy(
        name=name,
        selector=selector,
        types=frozenset(types),
        ingress=rules[Direction.INGRESS],
        egress=rules[Direction.EGRESS],
    )


_OUR_FIELDS = ("egress", "ingress", "name", "policyTypes", "selector")
_KUBERNETES_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_SPEC_FIELDS = ("egress", "ingress", "podSelector", "policyTypes")
# metadata that says nothing about what the policy allows (what `kubectl get
# -o yaml` prints); a namespace does, and is refused.
_METADATA_FIELDS = (
    "annotations",
    "creationTimestamp",
    "generation",
    "labels",
    "managedFields",
    "name",
    "namespace",
    "resourceVersion",
    "selfLink",
    "uid",
)


def _required_selector(obj: Mapping[str, Any], path: str, field: str) -> LabelSelector:
    if obj.get(field) is None:
        fail(join_path(path, field), "required ({} selects every endpoint)")
    return parse_selector(obj[field], join_path(path, field))


def _ours(root: Mapping[str, Any], name: str | None) -> Policy:
    hint = " (or write a Kubernetes NetworkPolicy)" if "podSelector" in root else ""
    check_known(root, "", _OUR_FIELDS, hint)
    policy_name = _policy_name(root.get("name"), "name", name)
    return _body(root, "", policy_name, _required_selector(root, "", "selector"), _OURS)


def _kubernetes(root: Mapping[str, Any], name: str | None) -> Policy:
    check_known(root, "", _KUBERNETES_FIELDS)
    kind = root.get("kind")
    if kind != "NetworkPolicy":
        fail(
            "kind",
            "required: NetworkPolicy" if kind is None else f"{show(kind)} is not NetworkPolicy",
        )
    api = root.get("apiVersion")
    if api != KUBERNETES_API_VERSION:
        given = "required" if api is None else f"{show(api)} is not supported"
        fail("apiVersion", f"{given}: {KUBERNETES_API_VERSION}")
    metadata = as_object(root.get("metadata") or {}, "metadata")
    check_known(metadata, "metadata", _METADATA_FIELDS)
    if metadata.get("namespace") is not None:
        fail("metadata.namespace", _NO_NAMESPACES)
    policy_name = _policy_name(metadata.get("name"), "metadata.name", name)
    if root.get("spec") is None:
        fail("spec", "required")
    spec = as_object(root["spec"], "spec")
    check_known(spec, "spec", _SPEC_FIELDS)
    selector = _required_selector(spec, "spec", "podSelector")
    return _body(spec, "spec", policy_name, selector, _KUBERNETES)


def parse_policy(
    document: str | bytes | bytearray | Mapping[str, Any], *, name: str | None = None
) -> Policy:
    """Validate a policy document (JSON or YAML text, or its data) of
    either shape; `name` fills in or must equal the document's name.
    Raises PolicyError naming the field at fault."""
    raw = load_document(document) if isinstance(document, str | bytes | bytearray) else document
    root = as_object(raw, "document")
    if root.keys() & {"apiVersion", "kind", "metadata", "spec"}:
        return _kubernetes(root, name)
    return _ours(root, name)


# --- rendering -----------------------------------------------------------------


def render_selector(selector: LabelSelector) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if selector.match_labels:
        found["matchLabels"] = dict(selector.match_labels)
    if selector.match_expressions:
        found["matchExpressions"] = [
            {"key": r.key, "operator": r.operator.value}
            | ({"values": sorted(r.values)} if r.values else {})
            for r in selector.match_expressions
        ]
    return found


def _render_peer(peer: PolicyPeer) -> dict[str, Any]:
    if isinstance(peer, SelectorPeer):
        return {"selector": render_selector(peer.selector)}
    block: dict[str, Any] = {"cidr": str(peer.cidr)}
    if peer.excepts:
        block["except"] = [str(net) for net in peer.excepts]
    return {"ipBlock": block}


def _render_port(port: PortRange) -> dict[str, Any]:
    found: dict[str, Any] = {"protocol": port.protocol.value}
    if port.first is not None:
        found["port"] = port.first
        if port.last is not None and port.last != port.first:
            found["endPort"] = port.last
    return found


def render_policy(policy: Policy) -> str:
    """The canonical document (our shape, JSON with sorted keys, policyTypes
    spelled out) that etcd holds: `parse_policy` gives the same Policy back.
    Raises PolicyError when it would be larger than MAX_POLICY_BYTES (a
    YAML document under the limit can grow in JSON), so that `policy apply`
    refuses it before anything is written."""
    document: dict[str, Any] = {
        "name": policy.name,
        "selector": render_selector(policy.selector),
        "policyTypes": [d.value for d in _BOTH if d in policy.types],
    }
    for direction in _BOTH:
        rules = policy.rules(direction)
        if direction not in policy.types and not rules:
            continue
        rendered = []
        for rule in rules:
            item: dict[str, Any] = {}
            if rule.peers:
                item[_PEERS_FIELD[direction]] = [_render_peer(peer) for peer in rule.peers]
            if rule.ports:
                item["ports"] = [_render_port(port) for port in rule.ports]
            rendered.append(item)
        document[_RULES_FIELD[direction]] = rendered
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(
            "document",
            f"its canonical form is {len(text)} bytes, more than {MAX_POLICY_BYTES}",
        )
    return text


# --- keys -------------------------------------------------------------------------


def policies_prefix(own_prefix: str) -> str:
    return f"{own_prefix.rstrip('/')}/policies/"


def policy_key(own_prefix: str, name: str) -> str:
    return policies_prefix(own_prefix) + name


def parse_policy_key(key: str, own_prefix: str) -> str:
    """The policy name a key under policies_prefix names; PolicyError for
    anything else."""
    prefix = policies_prefix(own_prefix)
    if not key.startswith(prefix):
        raise PolicyError("key", f"{show(key)} is not under {prefix}")
    name = key[len(prefix) :]
    problem = name_problem(name)
    if problem:
        raise PolicyError("key", f"{show(key)}: the name {problem}")
    return name


# key -> (value, the policy or why it is not used): each document parsed once.
PolicyCache = dict[str, tuple[bytes, "Policy | str"]]


def stored_policies(
    raw: Mapping[str, bytes], own_prefix: str, cache: PolicyCache | None = None
) -> tuple[list[Policy], dict[str, str]]:
    """The usable policies among the keys under policies_prefix (others are
    ignored), each document read as the daemon reads it (its key names
    it), and for every other key why it is not used: what the daemon
    enforces and `overlayctl policy list/check` show. Sorted by key. With
    a `cache` kept across calls (the daemon's), an unchanged document is
    not parsed again."""
    prefix = policies_prefix(own_prefix)
    usable: list[Policy] = []
    rejected: dict[str, str] = {}
    for key in sorted(raw):
        if not key.startswith(prefix):
            continue
        value = raw[key]
        hit = cache.get(key) if cache is not None else None
        if hit is None or hit[0] != value:
            try:
                found: Policy | str = parse_policy(value, name=parse_policy_key(key, own_prefix))
            except PolicyError as exc:
                found = str(exc)
            hit = (value, found)
            if cache is not None:
                cache[key] = hit
        if isinstance(hit[1], Policy):
            usable.append(hit[1])
        else:
            rejected[key] = hit[1]
    if cache is not None and len(cache) > len(raw):
        for gone in [k for k in cache if k not in raw]:
            del cache[gone]
    return usable, rejected


# --- the verdict ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirectionVerdict:
    """One direction's judgement at its endpoint: whether some policy
    isolates the endpoint in this direction (`selected_by` names them) and
    which of those allow the packet (`allowed_by`)."""

    isolated: bool = False
    selected_by: tuple[str, ...] = ()
    allowed_by: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.isolated or bool(self.allowed_by)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    ingress: DirectionVerdict
    egress: DirectionVerdict
    # The endpoints the addresses belong to (None: no endpoint's).
    source: Endpoint | None = None
    destination: Endpoint | None = None


def _rule_allows(
    rule: Rule, address: IPAddress, peer: Endpoint | None, protocol: Protocol, port: int
) -> bool:
    # An empty peers or ports tuple means "all", like None: Kubernetes reads
    # an empty `from`/`ports` that way.
    if rule.ports and not any(entry.matches(protocol, port) for entry in rule.ports):
        return False
    if not rule.peers:
        return True
    for candidate in rule.peers:
        if isinstance(candidate, IpBlock):
            if candidate.contains(address):
                return True
        elif peer is not None and candidate.selector.matches(peer.labels):
            return True
    return False


class PolicyChecker:
    """Verdicts for many packets against one set of policies and endpoints:
    the endpoints are indexed by address once (O(endpoints)), and each
    verdict costs O(policies x their rules), whatever the number of
    endpoints.

    An address claimed by more than one endpoint belongs to none (as
    plan/endpoints.select_endpoints rejects both claimants)."""

    def __init__(self, policies: Sequence[Policy], endpoints: Sequence[Endpoint]) -> None:
        by_address: dict[IPAddress, Endpoint | None] = {}
        for endpoint in endpoints:
            for address in endpoint.addresses:
                by_address[address] = None if address in by_address else endpoint
        self._by_address = by_address
        ordered = sorted(policies, key=lambda p: p.name)
        self._by_direction = {
            direction: tuple(p for p in ordered if direction in p.types) for direction in _BOTH
        }

    def endpoint(self, address: IPAddress) -> Endpoint | None:
        return self._by_address.get(address)

    def _judge(
        self,
        direction: Direction,
        local: Endpoint | None,
        remote: IPAddress,
        protocol: Protocol,
        port: int,
    ) -> DirectionVerdict:
        if local is None:
            return DirectionVerdict()
        remote_endpoint = self._by_address.get(remote)
        selected: list[str] = []
        allowed: list[str] = []
        for policy in self._by_direction[direction]:
            if not policy.selector.matches(local.labels):
                continue
            selected.append(policy.name)
            if any(
                _rule_allows(rule, remote, remote_endpoint, protocol, port)
                for rule in policy.rules(direction)
            ):
                allowed.append(policy.name)
        return DirectionVerdict(bool(selected), tuple(selected), tuple(allowed))

    def verdict(self, src: IPAddress, dst: IPAddress, protocol: Protocol, port: int) -> Verdict:
        source, destination = self._by_address.get(src), self._by_address.get(dst)
        egress = self._judge(Direction.EGRESS, source, dst, protocol, port)
        ingress = self._judge(Direction.INGRESS, destination, src, protocol, port)
        return Verdict(egress.allowed and ingress.allowed, ingress, egress, source, destination)


def verdict(
    policies: Sequence[Policy],
    endpoints: Sequence[Endpoint],
    src: IPAddress,
    dst: IPAddress,
    protocol: Protocol,
    port: int,
) -> Verdict:
    """Whether a new connection (or first packet) from src to dst on
    protocol/port is allowed, by Kubernetes NetworkPolicy rules:

    - egress is judged at the source endpoint (the one with address src, if
      any): it is isolated when some policy with Egress in its types
      selects it, and then allowed only when one of those policies has an
      egress rule whose peers match dst and whose ports match;
    - ingress likewise at the destination endpoint, with src;
    - a peer matches an address when it is an ipBlock containing it, or a
      selector selecting the labels of the endpoint with that address; an
      address that is no endpoint's is neither selected by a policy nor
      matched by a selector peer, only by ipBlocks;
    - rules for a direction the policy's types leave out are ignored.

    Allowed when both directions are. Replies to allowed connections and
    traffic between an endpoint and its own host always pass, but that is
    the enforcement's business (conntrack, host rules), not this function's:
    it judges the packet as a new connection between the two addresses."""
    return PolicyChecker(policies, endpoints).verdict(src, dst, protocol, port)
