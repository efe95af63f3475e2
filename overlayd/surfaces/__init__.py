"""What the daemon shows the outside: the control socket, the HTTP metrics
and health endpoint, MQTT events, systemd notify, logs, telemetry (the
in-memory record the others read) and flannel's subnet file.

May import: model, errors, plan, backoff, and the libraries each surface
speaks (prometheus_client, aiomqtt, sdnotify). Never the daemon package:
surfaces are told facts, they do not fetch them.
"""
