"""The Docker network plugin server: libnetwork's remote network driver and
remote IPAM driver, on a unix socket where dockerd looks for plugins
(/run/docker/plugins/overlayd.sock by default), served with aiohttp.

`docker network create -d overlayd --ipam-driver overlayd NAME` then gives
containers an address of this host's leased subnet on overlayd's bridge.

- Addresses come from CNI's standard host-local plugin, with the very store
  and range overlay-cni uses (dataDir/ipam, network "overlay", the lower
  half of the subnet), so podman and Docker containers on one host never get
  the same address. Each address is taken under a container ID of its own
  (`docker-<random>`), kept in this plugin's records, so a release frees
  exactly that address.
- Join makes a veth pair in the host's namespace, the host end on the
  overlay bridge with the overlay's MTU; Docker moves the other end into the
  container. Leave and DeleteEndpoint delete it.
- Published ports in masquerade (and none) mode reach this driver as
  ProgramExternalConnectivity; they are handed to CNI's standard portmap
  plugin (DNAT). In gwbridge mode Docker's own docker_gwbridge endpoint
  gets them instead (see plan/docker_plugin.py).

Requests are parsed and decided in plan/docker_plugin.py; this module does
the I/O. One lock serialises every request that changes something: Docker
sends few, and the records and kernel stay consistent without more care.
Every refusal is a 4xx/5xx with `{"Err": ...}`; nothing a client sends can
stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from aiohttp import web

from overlayd.dataplane import veth
from overlayd.plan import docker_plugin as plan
from overlayd.plan.docker_plugin import Endpoint, HostView, PluginError, Records
from overlayd.plan.host import Host

log = logging.getLogger("overlayd.docker_plugin")

PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
# overlay-cni's network name: host-local keeps its state under dataDir/ipam/<name>.
CNI_NETWORK = "overlay"
CNI_VERSION = "1.0.0"
MAX_REQUEST_BYTES = 1 << 20
PLUGIN_TIMEOUT_SECONDS = 30.0
PORTMAP_NETWORK = "overlayd-docker"  # names portmap's chains for Docker's endpoints


@dataclass(frozen=True, slots=True)
class PluginSettings:
    socket: Path
    cni_data_dir: Path  # overlay-cni's dataDir

    @property
    def ipam_dir(self) -> Path:
        return self.cni_data_dir / "ipam"

    @property
    def records_file(self) -> Path:
        return self.cni_data_dir / "docker-plugin" / "records.json"


class CniFailed(PluginError):
    def __init__(self, message: str) -> None:
        super().__init__(500, message)


def find_plugin(name: str) -> str:
    for directory in PLUGIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise CniFailed(f"the {name!r} CNI plugin is not in {', '.join(PLUGIN_DIRS)}")


async def call_cni(
    plugin: str, command: str, conf: dict[str, Any], *, container_id: str, netns: str
) -> dict[str, Any] | None:
    """Run a standard CNI plugin the way a runtime does."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": ":".join(PLUGIN_DIRS),
    }
    proc = await asyncio.create_subprocess_exec(
        find_plugin(plugin),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(PLUGIN_TIMEOUT_SECONDS):
            out, err = await proc.communicate(json.dumps(conf).encode())
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CniFailed(
            f"{plugin} {command} took longer than {PLUGIN_TIMEOUT_SECONDS:g} s"
        ) from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        try:
            msg = json.loads(text).get("msg", text)
        except (ValueError, AttributeError):
            msg = text or err.decode(errors="replace").strip()
        raise CniFailed(f"{plugin} {command}: {msg}")
    if not text:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        raise CniFailed(f"{plugin} {command} printed no JSON: {text[:200]}") from None
    return parsed if isinstance(parsed, dict) else None


def host_view(host: Host) -> HostView:
    """What the plugin needs of the daemon's current plan of this host."""
    return HostView(
        subnet=host.own.subnet,
        cluster=host.config.network,
        bridge=host.spec.bridge,
        mtu=host.spec.mtu,
        egress=host.egress.mode,
    )


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class DockerPlugin:
    def __init__(self, settings: PluginSettings, view: Callable[[], HostView]) -> None:
        self.settings = settings
        self.view = view
        self.records = self._load()
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

    def _load(self) -> Records:
        path = self.settings.records_file
        try:
            return Records.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return Records()
        except (ValueError, KeyError, TypeError) as exc:
            # Our own file, damaged: start empty rather than not at all, and
            # keep the damaged one for a human.
            log.error("event=docker_plugin_records_damaged path=%s error=%r", path, exc)
            path.rename(path.with_suffix(".damaged"))
            return Records()

    def _save(self) -> None:
        path = self.settings.records_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records.to_json(), indent=1))
        os.replace(tmp, path)

    # --- HTTP ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/{method}", self._dispatch)
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
        except PluginError as exc:
            answer, status = exc.body(), exc.status
            log.warning(
                "event=docker_request_refused method=%s status=%d err=%r",
                method[:80],
                status,
                exc.message,
            )
        except web.HTTPException:
            raise
        except Exception as exc:  # a surface answers, whatever went wrong
            log.exception("event=docker_request_failed method=%s", method[:80])
            answer, status = {"Err": f"overlayd: {type(exc).__name__}: {exc}"}, 500
        return web.json_response(answer, status=status, content_type=plan.CONTENT_TYPE)

    async def serve(self) -> None:
        """Listen until cancelled; the socket file goes with the server."""
        path = self.settings.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        old_umask = os.umask(0o177)  # root's only, never briefly wider
        try:
            site = web.UnixSite(runner, str(path))
            await site.start()
        finally:
            os.umask(old_umask)
        log.info("event=docker_plugin_listening socket=%s", path)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            path.unlink(missing_ok=True)

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
        network_id, subnet = plan.create_network(raw, self.view())
        async with self._lock:
            if network_id in self.records.networks:
                raise plan.bad(f"network {network_id} exists already")
            self.records.networks[network_id] = subnet
            self._save()
        log.info("event=docker_network_created id=%s subnet=%s", network_id[:12], subnet)
        return {}

    async def _delete_network(self, raw: dict[str, Any]) -> dict[str, Any]:
        network_id = plan.parse_network_id(raw)
        async with self._lock:
            self.records.network(network_id)
            left = [e for e, ep in self.records.endpoints.items() if ep.network_id == network_id]
            if left:
                raise PluginError(409, f"network {network_id} still has {len(left)} endpoints")
            del self.records.networks[network_id]
            self._save()
        log.info("event=docker_network_deleted id=%s", network_id[:12])
        return {}

    async def _create_endpoint(self, raw: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            req = plan.create_endpoint(raw, self.records, self.view())
            self.records.endpoints[req.endpoint_id] = Endpoint(req.network_id, req.address, req.mac)
            self._save()
        log.info(
            "event=docker_endpoint_created id=%s address=%s options=%s",
            req.endpoint_id[:12],
            req.address,
            json.dumps(req.options, sort_keys=True)[:2000],
        )
        # The address came from our IPAM: Docker must not be told it again
        # (it refuses a driver that "modifies" the address).
        return {"Interface": {}}

    async def _delete_endpoint(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        async with self._lock:
            self.records.network(ids.network_id)
            endpoint = self.records.endpoints.get(ids.endpoint_id)
            if endpoint is None:
                return {}  # deleted already: DeleteEndpoint is idempotent
            await self._unplug(ids.endpoint_id, endpoint)
            del self.records.endpoints[ids.endpoint_id]
            self._save()
        log.info("event=docker_endpoint_deleted id=%s", ids.endpoint_id[:12])
        return {}

    async def _endpoint_info(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        endpoint = self.records.endpoint(ids.network_id, ids.endpoint_id)
        host, _ = plan.veth_names(ids.endpoint_id)
        return {"Value": {"address": str(endpoint.address), "host_veth": host}}

    async def _join(self, raw: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        async with self._lock:
            req = plan.join(raw, self.records)
            endpoint = self.records.endpoint(req.network_id, req.endpoint_id)
            host, peer = plan.veth_names(req.endpoint_id)
            await veth.add_pair(host, peer, bridge=view.bridge, mtu=view.mtu, mac=endpoint.mac)
            endpoint.sandbox = req.sandbox
            self._save()
        log.info(
            "event=docker_join id=%s veth=%s sandbox=%s", req.endpoint_id[:12], host, req.sandbox
        )
        return plan.join_response(view, req.endpoint_id)

    async def _leave(self, raw: dict[str, Any]) -> dict[str, Any]:
        ids = plan.parse_endpoint_ids(raw)
        async with self._lock:
            self.records.network(ids.network_id)
            endpoint = self.records.endpoints.get(ids.endpoint_id)
            if endpoint is None:
                return {}
            await self._unplug(ids.endpoint_id, endpoint)
            self._save()
        log.info("event=docker_leave id=%s", ids.endpoint_id[:12])
        return {}

    async def _unplug(self, endpoint_id: str, endpoint: Endpoint) -> None:
        """Published ports and the veth pair go; the address stays until
        Docker releases it through IPAM."""
        if endpoint.ports:
            await self._portmap("DEL", endpoint_id, endpoint, endpoint.ports)
            endpoint.ports = []
        host, _ = plan.veth_names(endpoint_id)
        await veth.delete(host)
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
                "ips": [{"address": str(endpoint.address), "interface": 0}],
            },
        }

    async def _portmap(
        self, command: str, endpoint_id: str, endpoint: Endpoint, ports: list[dict[str, Any]]
    ) -> None:
        await call_cni(
            "portmap",
            command,
            self._portmap_conf(endpoint, ports),
            container_id=endpoint_id,
            netns=endpoint.sandbox or "/proc/self/ns/net",
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

    def _host_local_conf(self, view: HostView) -> dict[str, Any]:
        return {
            "cniVersion": CNI_VERSION,
            "name": CNI_NETWORK,
            "ipam": view.host_local_ipam(str(self.settings.ipam_dir)),
        }

    async def _request_address(self, raw: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        req = plan.request_address(raw, view)
        if req.gateway:
            return plan.address_answer(view.gateway, req.subnet)
        conf = self._host_local_conf(view)
        if req.address is not None:
            conf["args"] = {"cni": {"ips": [str(req.address)]}}
        container_id = f"docker-{secrets.token_hex(16)}"
        async with self._lock:
            result = await call_cni(
                "host-local", "ADD", conf, container_id=container_id, netns="/proc/self/ns/net"
            )
            try:
                address = IPv4Interface(result["ips"][0]["address"]).ip  # type: ignore[index]
            except (TypeError, KeyError, IndexError, ValueError):
                await call_cni(
                    "host-local", "DEL", conf, container_id=container_id, netns="/proc/self/ns/net"
                )
                raise CniFailed(f"host-local gave no address: {result}") from None
            self.records.addresses[address] = container_id
            self._save()
        log.info("event=docker_address_taken address=%s cni_id=%s", address, container_id)
        return plan.address_answer(address, req.subnet)

    async def _release_address(self, raw: dict[str, Any]) -> dict[str, Any]:
        view = self.view()
        address = plan.release_address(raw, view)
        async with self._lock:
            container_id = self.records.addresses.get(address)
            if container_id is None:
                # The gateway, or an address released already.
                return {}
            await call_cni(
                "host-local",
                "DEL",
                self._host_local_conf(view),
                container_id=container_id,
                netns="/proc/self/ns/net",
            )
            del self.records.addresses[address]
            self._save()
        log.info("event=docker_address_released address=%s", address)
        return {}

    def allocated(self) -> dict[IPv4Address, str]:
        return dict(self.records.addresses)
