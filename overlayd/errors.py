"""Exception types that carry the name of the field or object at fault."""


class OverlaydError(Exception):
    """Base class of the errors overlayd reports to its user."""


class ConfigError(OverlaydError):
    """A config value is invalid; `field` names it as the user wrote it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class LeaseError(OverlaydError):
    """A lease read from the store is unusable; the reason is one line."""


class SubnetsExhaustedError(OverlaydError):
    """No free subnet is left in the network."""


class DocumentError(OverlaydError):
    """A document (a policy, a service) is refused; `field` is the path of
    the field at fault as the document spells it
    ("spec.ingress[0].ports[2].endPort"), and the message always starts
    with it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class PolicyError(DocumentError):
    """A policy document is refused (see DocumentError)."""


class ServiceError(DocumentError):
    """A service definition is refused (see DocumentError)."""


class EndpointError(OverlaydError):
    """An endpoint registration (key, value or labels) is unusable; the
    reason is one line and names what is at fault."""
