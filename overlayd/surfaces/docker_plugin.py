"""The Docker network plugin server: libnetwork's remote network driver and
remote IPAM driver, on a unix socket where dockerd looks for plugins
(/run/docker/plugins/overlayd.sock by default), served with aiohttp.

`docker network create -d overlayd --ipam-driver overlayd NAME` then gives
containers an address of this host's leased subnet on overlayd's bridge.

- Addresses come from CNI's standard host-local plugin, with the very store
  and range overlay-cni uses (dataDir/ipam, network "overlay", host-local's
  half of the subnet, plan/ipam.py), so podman and Docker containers on one host never get
  the same address. Each address is taken under a container ID of its own
  (`docker-<random>`), kept in this plugin's records, so a release frees
  exactly that address. Docker asks for an IPv6 address separately, from
  the IPv6 pool of a `--ipv6` network: host-local then gets the IPv6 range
  alone, in the same store. (host-local keeps its round-robin position per
  range index, and both families' requests are range 0 here, so in a
  dual-stack network it restarts from the start of the range more often:
  addresses are still never handed out twice.)
- Join makes a veth pair in the host's namespace, the host end on the
  overlay bridge with the overlay's MTU; Docker moves the other end into the
  container. Leave and DeleteEndpoint delete it.
- Published ports in masquerade (and none) mode reach this driver as
  ProgramExternalConnectivity; they are handed to CNI's standard portmap
  plugin (DNAT). In gwbridge mode Docker's own docker_gwbridge endpoint
  gets them instead (see plan/docker_plugin.py).

- Join registers the endpoint for network policy (its addresses, and the
  name and labels from its driver options: plan/docker_plugin.py) through
  the callables the composition root passes (the daemon's endpoint
  registry, in-process), and answers only once it is in force; a refusal
  fails the Join and takes the veth away again. Leave and DeleteEndpoint
  unregister it (a failure is logged: Docker does not ask twice).

Requests are parsed and decided in plan/docker_plugin.py; this module does
the I/O. The kernel and the CNI plugins are reached only through two ports
that the composition root (daemon/agent.py) fills in: `VethPort`
(dataplane/veth.VethPairs) and `CniPort` (nsexec.CniRunner); unit tests
give fakes. One lock serialises every request that changes something:
Docker sends few, and the records and kernel stay consistent without more
care. Every refusal is a 4xx/5xx with `{"Err": ...}`; nothing a client
sends can stop the server, and `run` keeps the plugin's own failures (a
socket path that cannot be used, say) away from the rest of the daemon.

Level-triggered at start (`start`): a damaged records file is set aside
and the plugin starts empty; host-local reservations under this plugin's
`docker-` IDs that no record holds are released; ovd* ports of the bridge
that belong to no recorded endpoint are deleted, and joined endpoints whose
veth is gone are logged (Docker deletes them itself, or the container stays
without its interface until restarted). Nothing repairs them later while
running: a veth deleted by hand is noticed only at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from overlayd.backoff import sleep_backoff
from overlayd.model import IPAddress, IPNetwork
from overlayd.plan import docker_plugin as plan
from overlayd.plan.docker_plugin import Endpoint, HostView, PluginError, Records
from overlayd.plan.ipam import HOST_LOCAL_STORE

log = logging.getLogger("overlayd.docker_plugin")

CNI_VERSION = "1.0.0"
MAX_REQUEST_BYTES = 1 << 20
PORTMAP_NETWORK = "overlayd-docker"  # names portmap's chains for Docker's endpoints
HOST_NETNS = "/proc/self/ns/net"  # host-local needs a netns path, and uses none
# A plugin that failed stays down this long at most before it tries again.
RETRY_CAP_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class PluginSettings:
    socket: Path
    cni_data_dir: Path  # overlay-cni's dataDir

    @property
    def ipam_dir(self) -> Path:
        return self.cni_data_dir / "ipam"

    @property
    def host_local_store(self) -> Path:
        """Where host-local keeps one file per reserved address."""
        return self.ipam_dir / HOST_LOCAL_STORE

    @property
    def records_file(self) -> Path:
        return self.cni_data_dir / "docker-plugin" / "records.json"


class CniPort(Protocol):
    """Runs a standard CNI plugin by name (nsexec.CniRunner): answers
    (succeeded, parsed result or error, raw text)."""

    async def __call__(
        self, plugin: str, command: str, conf: Mapping[str, Any], *, container_id: str, netns: str
    ) -> tuple[bool, Any, str]: ...


class VethPort(Protocol):
    """The endpoints' veth pairs in the host's namespace (dataplane/veth.VethPairs)."""

    async def exists(self, name: str) -> bool: ...

    async def add_pair(
        self, host: str, peer: str, *, bridge: str, mtu: int, mac: str | None
    ) -> None: ...

    async def delete(self, host: str) -> bool: ...

    async def bridge_ports(self, bridge: str, prefix: str) -> list[str]: ...


class CniFailed(PluginError):
    def __init__(self, message: str) -> None:
        super().__init__(500, message)


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# The endpoint registry's register and unregister (daemon/endpoints.py),
# called with the control socket's arguments: {"id", "name", "addresses",
# "labels"} and {"id"}. They raise when they refuse.
EndpointCall = Callable[[Mapping[str, Any]], Awaitable[Any]]


def _error_text(parsed: Any, raw: str) -> str:
    if isinstance(parsed, dict) and isinstance(parsed.get("msg"), str):
        return str(parsed["msg"])
    return raw


class DockerPlugin:
    def __init__(
        self,
        settings: PluginSettings,
        view: Callable[[], HostView],
        *,
        cni: CniPort,
        veths: VethPort,
        register: EndpointCall | None = None,
        unregister: EndpointCall | None = None,
    ) -> None:
        self.settings = settings
        self.view = view
        self.cni = cni
        self.veths = veths
        # None: endpoints are not registered (policies cannot select them).
        self.register = register
        self.unregister = unregister
        self.records = Records()  # read from disk by start()
        self._lock = asyncio.Lock()
        self.handlers: dict[str, tuple[Handler, bool]] = {
            # name -> (handler, takes no arguments)
            "Plugin.Activate": (self._activate, True),
            "NetworkDriver.GetCapabilities": (self._capabilities, True),
            "NetworkDriver.CreateNetwork": (self._create_network, False),
            "NetworkDriver.DeleteNetwork": (self._delete_network, False),
            "NetworkDriver.CreateEndpoint": (self._create_endpoint, False),
            "NetworkDriver.DeleteEndpoint": (self._delete_endpoint, False),
            "NetworkDriver.EndpointOperInfo": (self._endpoint_info, False),
            "NetworkDriver.Join": (self._join, False),
            "NetworkDriver.Leave": (self._leave, False),
            "NetworkDriver.DiscoverNew": (self._nothing, False),
            "NetworkDriver.DiscoverDelete": (self._nothing, False),
            "NetworkDriver.ProgramExternalConnectivity": (self._program_ports, False),
            "NetworkDriver.RevokeExternalConnectivity": (self._revoke_ports, False),
            "IpamDriver.GetCapabilities": (self._ipam_capabilities, True),
            "IpamDriver.GetDefaultAddressSpaces": (self._address_spaces, True),
            "IpamDriver.RequestPool": (self._request_pool, False),
            "IpamDriver.ReleasePool": (self._release_pool, False),
            "IpamDriver.RequestAddress": (self._request_address, False),
            "IpamDriver.ReleaseAddress": (self._release_address, False),
        }

    # --- records ------------------------------------------------------------

    def _load(self) -> tuple[Records, bool]:
        """The records, and whether they were read whole (False: missing or
        damaged, so what is on the host cannot be judged by them)."""
        path = self.settings.records_file
        try:
            return Records.from_json(json.loads(path.read_text())), True
        except FileNotFoundError:
            return Records(), False
        except Exception as exc:  # any damage, even a directory in its place
            # Our own file, damaged: start empty rather than not at all, and
            # keep the damaged one for a human, never over an earlier one.
            kept = path.with_name(f"{path.name}.damaged-{time.time_ns()}")
            try:
                path.rename(kept)
            except OSError as rename_failed:
                kept = Path(f"(not kept: {rename_failed!r})")
            log.error(
                "event=docker_plugin_records_damaged path=%s error=%r kept=%s", path, exc, kept
            )
            return Records(), False

    def _save(self) -> None:
        """Written whole and renamed, with both the file and the directory
        synced, so a crash leaves the old records or the new, never none."""
        path = self.settings.records_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(self.records.to_json(), indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    # --- start: level-triggered repairs ---------------------------------------

    async def start(self) -> None:
        """Records from disk, then what they say repaired (see the module's
        docstring). Without whole records nothing is repaired away: running
        containers' addresses and veths are adopted instead."""
        self.records, intact = self._load()
        if not intact:
            ports = await self.veths.bridge_ports(self.view().bridge, plan.HOST_VETH_PREFIX)
            addresses, veths = plan.adopt(self.records, self._reservations(), ports)
            if addresses or veths:
                log.error(
                    "event=docker_plugin_records_lost adopted_addresses=%d adopted_veths=%d"
                    " effect=%r",
                    addresses,
                    veths,
                    "kept for the running containers, released when Docker releases them",
                )
            self._save()
        await self._release_orphans()
        await self._repair_veths()

    def _reservations(self) -> dict[IPAddress, str]:
        """host-local's store: one file per address (of either family), named
        by it, holding the container ID on its first line."""
        found: dict[IPAddress, str] = {}
        store = self.settings.host_local_store
        if not store.is_dir():
            return found
        for entry in store.iterdir():
            try:
                address = ip_address(entry.name)
            except ValueError:
                continue  # lock, last_reserved_ip.0
            try:
                lines = entry.read_text(errors="replace").splitlines()
            except OSError:
                continue
            if lines:
                found[address] = lines[0].strip()
        return found

    async def _release_orphans(self) -> None:
        for address, owner in sorted(
            plan.orphan_reservations(self._reservations(), self.records).items()
        ):
            try:
                await self._cni(
                    "host-local",
                    "DEL",
                    self._host_local_conf(self.view()),
                    container_id=owner,
                    netns=HOST_NETNS,
                )
            except PluginError as exc:
                log.error(
                    "event=docker_orphan_release_failed address=%s cni_id=%s error=%r",
                    address,
                    owner,
                    exc.message,
                )
                continue
            log.warning("event=docker_orphan_released address=%s cni_id=%s", address, owner)

    async def _repair_veths(self) -> None:
        view = self.view()
        ports = await self.veths.bridge_ports(view.bridge, plan.HOST_VETH_PREFIX)
        stale, missing = plan.veth_repairs(self.records, ports)
        for name in stale:
            await self.veths.delete(name)
            log.warning("event=docker_stale_veth_deleted veth=%s", name)
        for endpoint_id in missing:
            log.error(
                "event=docker_veth_missing endpoint=%s sandbox=%s effect=%r",
                endpoint_id[:12],
                self.records.endpoints[endpoint_id].sandbox,
                "the container has no overlay interface until it is restarted",
            )

    # --- HTTP ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{method:.*}", self._dispatch)
        return app

    async def _dispatch(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            entry = self.handlers.get(method)
            if entry is None:
                raise plan.unknown(f"{method[:80]!r} is not a method of this plugin")
            if request.method != "POST":
                raise PluginError(405, "plugin methods are called with POST")
            handler, empty_ok = entry
            body = await request.read()
            log.debug(
                "event=docker_request method=%s body=%s",
                method,
                body[:4000].decode(errors="replace"),
            )
            raw = plan.parse_body(body, empty_ok=empty_ok)
            answer = await handler(raw)
            status = 200
        except web.HTTPException as exc:  # aiohttp's own refusals (a body too large)
            answer, status = {"Err": exc.text or exc.reason}, exc.status
            log.warning(
                "event=docker_request_refused method=%s status=%d err=%r",
                method[:80],
                status,
                answer["Err"],
            )
        except PluginError as exc:
            answer, status = exc.body(), exc.status
            log.warning(
                "event=docker_request_refused method=%s status=%d err=%r",
                method[:80],
                status,
                exc.message,
            )
        except Exception as exc:  # a surface answers, whatever went wrong
            log.exception("event=docker_request_failed method=%s", method[:80])
            answer, status = {"Err": f"overlayd: {type(exc).__name__}: {exc}"}, 500
        return web.json_response(answer, status=status, content_type=plan.CONTENT_TYPE)

    async def serve(self) -> None:
        """Repair, then listen until cancelled; the socket file goes with the server."""
        await self.start()
        path = self.settings.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            old_umask = os.umask(0o177)  # root's only, never briefly wider
            try:
                site = web.UnixSite(runner, str(path))
                await site.start()
            finally:
                os.umask(old_umask)
            log.info("event=docker_plugin_listening socket=%s", path)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    async def run(self) -> None:
        """`serve`, again and again with backoff: the plugin failing (its
        socket path unusable, its records directory read-only) is logged and
        never ends the daemon, which runs the overlay regardless."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self.serve()
            except Exception:
                log.exception("event=docker_plugin_failed retry=backoff")
            if time.monotonic() - started > RETRY_CAP_SECONDS:
                attempt = 0  # it served a while: a new failure, not the same one
            await sleep_backoff(attempt, base=1.0, cap=RETRY_CAP_SECONDS)
            attempt += 1

    # --- CNI ------------------------------------------------------------------------

    async def _cni(
        self, plugin: str, command: str, conf: Mapping[str, Any], *, container_id: str, netns: str
    ) -> Any:
        ok, parsed, raw = await self.cni(
            plugin, command, conf, container_id=container_id, netns=netns
        )
        if not ok:
            raise CniFailed(f"{plugin} {command}: {_error_text(parsed, raw)}")
        return parsed

    # --- Plugin and capabilities ---------------------------------------------

    async def _activate(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {"Implements": list(plan.IMPLEMENTS)}

    async def _capabilities(self, raw: dict[str, Any]) -> dict[str, Any]:
        # local: each host's dockerd has its own network of the same name,
        # on its own subnet; overlayd connects them.
        return {"Scope": "local", "ConnectivityScope": "local"}

    async def _ipam_capabilities(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {"RequiresMACAddress": False, "RequiresRequestReplay": False}

    async def _address_spaces(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {
            "LocalDefaultAddressSpace": plan.ADDRESS_SPACE,
            "GlobalDefaultAddressSpace": plan.ADDRESS_SPACE,
        }

    async def _nothing(self, raw: dict[str, Any]) -> dict[str, Any]:
        return {}

    # --- networks and endpoints ------------------------------------------------

    async def _create_network(self, raw: dict[str, Any]) -> dict[str, Any]:
        network_id, subnet, subnet6 = plan.create_network(raw, self.view())
        async with self._lock:
            if network_id in self.records.networks:
                raise plan.bad(f"network {network_id} exists already")
            self.records.networks[network_id] = subnet
            if subnet6 is not None:
                self.records.networks6[network_id] = subnet6
            self._save()
        log.info(
            "event=docker_network_created id=%s subnet=%s subnet6=%s",
            network_id[:12],
            subnet,
            subnet6 or "-",
        )
        return {}

    async def _delete_network(self, raw: dict[str, Any]) -> dict[str, Any]:
        network_id = plan.parse_network_id(raw)
        async with self._lock:
            self.records.network(network_id)
            left = [e for e, ep in self.records.endpoints.items() if ep.network_id == network_id]
            if left:
                raise PluginError(409, f"network {network_id} still has {len(left)} endpoints")
            del self.records.networks[network_id]
            self.records.networks6.pop(network_id, None)
            self._save()
        log.info("event=docker_network_deleted id=%s", network_id[:12])
        return {}

    async def _create_endpoint(self, raw: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            req = plan.create_endpoint(raw, self.records, self.view())
            self.records.endpoints[req.endpoint_id] = Endpoint(
                req.network_id,
                req.address,
                req.mac,
                address6=req.address6,
                name=req.name,
                labels=req.labels,
            )
            self._save()
        log.info(
            "event=docker_endpoint_created id=%s address=%s address6=%s options=%s",
            req.endpoint_id[:12],
            req.address,
            req.address6 or "-",
            json.dumps(req.options, sort_keys=True)[:2000],
        )
        # The address came from our IPAM: Docker must not be told it again
        # (it refuses a driver that "modifies" the address).
        return {"Interface": {}}

    async def _drop_adopted(self, endpoint_id: str) -> bool:
        """An endpoint from before the records were lost: its veth goes
        (when it was adopted) and nothing else is known of it."""
        host, _ = plan.veth_names(endpoint_id)
        if host not in self.records.adopted_veths:
            return False
        await self._unregister(endpoint_id)
        try:
            await self.veths.delete(host)
        except Exception as exc:
            log.error(
                "event=docker_unplug_failed id=%s veth=%s error=%r", endpoint_id[:12], host, exc
            )
        self.records.adopted_veths.discard(host)
        self._save()
        log.info("event=docker_adopted_veth_deleted id=%s veth=%s", endpoint_id[:12], host)
        return True

    async def _endpoint_to_unplug(self, ids: plan.NetworkIds) -> Endpoint | None:
        """The recorded endpoint Leave or DeleteEndpoint names; None when
        there is nothing (more) to do: gone already (both are idempotent),
        or known only by a veth adopted from lost records, now deleted. An
        unknown network is refused."""
        if ids.endpoint_id not in self.records.endpoints and await self._drop_adopted(
            ids.endpoint_id
        ):
            return None
        self.records.network(ids.network_id)
        return self.records.endpoints.get(ids.endpoint_id)

    async def _delete_endpoint(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        async with self._lock:
            endpoint = await self._endpoint_to_unplug(ids)
            if endpoint is None:
                return {}
            # The record goes whatever the unplugging managed: Docker does
            # not ask twice, and a record left would block DeleteNetwork.
            await self._unplug(ids.endpoint_id, endpoint)
            del self.records.endpoints[ids.endpoint_id]
            self._save()
        log.info("event=docker_endpoint_deleted id=%s", ids.endpoint_id[:12])
        return {}

    async def _endpoint_info(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        endpoint = self.records.endpoint(ids.network_id, ids.endpoint_id)
        host, _ = plan.veth_names(ids.endpoint_id)
        value = {"address": str(endpoint.address), "host_veth": host}
        if endpoint.address6 is not None:
            value["address6"] = str(endpoint.address6)
        return {"Value": value}

    async def _join(self, raw: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        async with self._lock:
            req = plan.join(raw, self.records)
            endpoint = self.records.endpoint(req.network_id, req.endpoint_id)
            host, peer = plan.veth_names(req.endpoint_id)
            if await self.veths.exists(host):
                if not await self.veths.exists(peer):
                    # Its peer was moved into a container: that is a live
                    # interface, never to be pulled out by a Join.
                    raise PluginError(409, f"{host} is in use by a container: Leave first")
                await self.veths.delete(host)  # a pair made but never handed over
            await self.veths.add_pair(
                host, peer, bridge=view.bridge, mtu=view.mtu, mac=endpoint.link_mac(req.endpoint_id)
            )
            try:
                await self._register(req.endpoint_id, endpoint)
            except PluginError:
                with contextlib.suppress(Exception):
                    await self.veths.delete(host)
                raise
            endpoint.sandbox = req.sandbox
            self._save()
        log.info(
            "event=docker_join id=%s veth=%s sandbox=%s", req.endpoint_id[:12], host, req.sandbox
        )
        return plan.join_response(view, req.endpoint_id, ipv6=endpoint.address6 is not None)

    async def _leave(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        async with self._lock:
            endpoint = await self._endpoint_to_unplug(ids)
            if endpoint is None:
                return {}
            await self._unplug(ids.endpoint_id, endpoint)
            self._save()
        log.info("event=docker_leave id=%s", ids.endpoint_id[:12])
        return {}

    async def _register(self, endpoint_id: str, endpoint: Endpoint) -> None:
        """The endpoint registered and in force here, or PluginError: a
        container must not start outside the policies that select it."""
        if self.register is None:
            return
        request = endpoint.registration(endpoint_id)
        try:
            await self.register(request)
        except Exception as exc:
            # Registered but not yet in force (a timeout) counts as refused:
            # the registration goes too.
            await self._unregister(endpoint_id)
            raise PluginError(
                500,
                f"overlayd could not register endpoint {request['name']} for network policy"
                f" ({exc}): the container is not attached",
            ) from exc

    async def _unregister(self, endpoint_id: str) -> None:
        if self.unregister is None:
            return
        try:
            await self.unregister({"id": endpoint_id})
        except Exception as exc:
            log.error(
                "event=docker_unregister_failed id=%s error=%r effect=%r",
                endpoint_id[:12],
                str(exc),
                "its registration stays until this host's lease ends",
            )

    async def _unplug(self, endpoint_id: str, endpoint: Endpoint) -> None:
        """Published ports and the veth pair go, each as far as it will: a
        failure is logged and the rest done anyway (Docker carries on after
        a failed Leave or DeleteEndpoint and never asks again). The address
        stays until Docker releases it through IPAM."""
        # The registration first: its address must not stay selected once
        # the container is gone (both Leave and DeleteEndpoint come here,
        # and unregistering twice is no error).
        await self._unregister(endpoint_id)
        host, _ = plan.veth_names(endpoint_id)
        if endpoint.ports:
            try:
                await self._portmap("DEL", endpoint_id, endpoint, endpoint.ports)
            except Exception as exc:
                log.error(
                    "event=docker_unplug_failed id=%s step=portmap ports=%s error=%r",
                    endpoint_id[:12],
                    json.dumps(endpoint.ports),
                    exc,
                )
            endpoint.ports = []
        # The name comes from the ID's first 12 digits: an unjoined endpoint
        # whose twin holds that veth in a container must leave it alone.
        twin_joined = any(
            other is not endpoint
            and other.sandbox is not None
            and plan.veth_names(other_id)[0] == host
            for other_id, other in self.records.endpoints.items()
        )
        try:
            if not twin_joined:
                await self.veths.delete(host)
        except Exception as exc:
            log.error(
                "event=docker_unplug_failed id=%s step=veth veth=%s error=%r",
                endpoint_id[:12],
                host,
                exc,
            )
        endpoint.sandbox = None

    # --- published ports ---------------------------------------------------------

    def _portmap_conf(self, endpoint: Endpoint, ports: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "cniVersion": CNI_VERSION,
            "name": PORTMAP_NETWORK,
            "type": "portmap",
            "capabilities": {"portMappings": True},
            "runtimeConfig": {"portMappings": ports},
            "prevResult": {
                "cniVersion": CNI_VERSION,
                "interfaces": [{"name": "eth0", "sandbox": endpoint.sandbox or ""}],
                # Every address: portmap maps each family to its own.
                "ips": [
                    {"address": str(address), "interface": 0} for address in endpoint.addresses()
                ],
            },
        }

    async def _portmap(
        self, command: str, endpoint_id: str, endpoint: Endpoint, ports: list[dict[str, Any]]
    ) -> None:
        await self._cni(
            "portmap",
            command,
            self._portmap_conf(endpoint, ports),
            container_id=endpoint_id,
            netns=endpoint.sandbox or HOST_NETNS,
        )

    async def _program_ports(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids, ports = plan.program_ports(raw)
        async with self._lock:
            endpoint = self.records.endpoint(ids.network_id, ids.endpoint_id)
            if ports == endpoint.ports:
                return {}
            if endpoint.ports:
                await self._portmap("DEL", ids.endpoint_id, endpoint, endpoint.ports)
                endpoint.ports = []
                self._save()
            if ports:
                try:
                    await self._portmap("ADD", ids.endpoint_id, endpoint, ports)
                except PluginError:
                    with contextlib.suppress(PluginError):
                        await self._portmap("DEL", ids.endpoint_id, endpoint, ports)
                    raise
                endpoint.ports = ports
                self._save()
        log.info("event=docker_ports id=%s ports=%s", ids.endpoint_id[:12], json.dumps(ports))
        return {}

    async def _revoke_ports(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        async with self._lock:
            self.records.network(ids.network_id)
            endpoint = self.records.endpoints.get(ids.endpoint_id)
            if endpoint is not None and endpoint.ports:
                await self._portmap("DEL", ids.endpoint_id, endpoint, endpoint.ports)
                endpoint.ports = []
                self._save()
        return {}

    # --- IPAM ---------------------------------------------------------------------

    async def _request_pool(self, raw: dict[str, Any]) -> dict[str, Any]:
        return plan.request_pool(raw, self.view())

    async def _release_pool(self, raw: dict[str, Any]) -> dict[str, Any]:
        plan.release_pool(raw)
        return {}

    def _host_local_conf(
        self, view: HostView, subnets: list[IPNetwork] | None = None
    ) -> dict[str, Any]:
        """host-local for `subnets` (default: every subnet of this host, as
        DEL wants it: host-local releases by container ID in any range)."""
        return {
            "cniVersion": CNI_VERSION,
            "name": HOST_LOCAL_STORE,
            "ipam": view.host_local_ipam(str(self.settings.ipam_dir), subnets or view.subnets()),
        }

    async def _request_address(self, raw: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        req = plan.request_address(raw, view)
        if req.gateway and req.address is not None:  # the bridge's address of that family
            return plan.address_answer(req.address, req.subnet)
        # One family's range only: host-local gives an address from each range.
        conf = self._host_local_conf(view, [req.subnet])
        if req.address is not None:
            conf["args"] = {"cni": {"ips": [str(req.address)]}}
        container_id = f"{plan.CONTAINER_ID_PREFIX}{secrets.token_hex(16)}"
        async with self._lock:
            try:
                result = await self._cni(
                    "host-local", "ADD", conf, container_id=container_id, netns=HOST_NETNS
                )
                address = plan.host_local_address(result, req.subnet)
                if address is None:
                    raise CniFailed(f"host-local gave no address: {json.dumps(result)[:200]}")
                self.records.addresses[address] = container_id
                self._save()
            except BaseException:
                # Failed, or cancelled (Docker gave up, the daemon stops):
                # whatever host-local reserved under this ID is freed, or it
                # would stay taken with no record (start() frees it otherwise).
                self.records.addresses = {
                    a: c for a, c in self.records.addresses.items() if c != container_id
                }
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        self._cni(
                            "host-local", "DEL", conf, container_id=container_id, netns=HOST_NETNS
                        )
                    )
                raise
        log.info("event=docker_address_taken address=%s cni_id=%s", address, container_id)
        return plan.address_answer(address, req.subnet)

    async def _release_address(self, raw: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        async with self._lock:
            address = plan.release_address(raw, view, self.records)
            container_id = self.records.addresses.get(address)
            if container_id is None:
                # The gateway, or an address released already.
                return {}
            # host-local releases by container ID, in whatever range the
            # address was: the current subnet's config frees an old one too.
            try:
                await self._cni(
                    "host-local",
                    "DEL",
                    self._host_local_conf(view),
                    container_id=container_id,
                    netns=HOST_NETNS,
                )
            except PluginError as exc:
                # Docker never asks twice: the record goes, and the next
                # start releases the reservation as an orphan.
                log.error(
                    "event=docker_address_release_failed address=%s cni_id=%s error=%r effect=%r",
                    address,
                    container_id,
                    exc.message,
                    "released at the next start",
                )
            del self.records.addresses[address]
            self._save()
        log.info("event=docker_address_released address=%s", address)
        return {}
