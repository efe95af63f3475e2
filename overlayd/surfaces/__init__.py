"""What the daemon shows the outside: the control socket, the HTTP metrics
and health endpoint, MQTT events, systemd notify, logs, telemetry (the
in-memory record the others read), flannel's subnet file and Docker's
network plugin.

May import: model, errors, plan, backoff, and the libraries each surface
speaks (prometheus_client, aiomqtt, sdnotify, aiohttp). Never the daemon
package, the dataplane or nsexec: surfaces are told facts, they do not
fetch them. A surface that must act on the host (the Docker plugin makes
veth pairs and runs CNI plugins) declares typing.Protocol ports, which the
composition root (daemon/agent.py) fills with the adapters.
"""
