"""The two error families of the cores.

``LocalProtocolError``: we misused an API (a bug on our side; may raise);
``InvalidArgument`` is the one builders and constructors raise.
``RemoteProtocolError`` / ``MalformedPacket`` / ``MalformedMessage``: bad input from the
wire or the portal. Cores catch these at their ``handle_*`` boundary, count and drop; they
never escape to the shells. Parsers of hostile input raise nothing else (``tests/fuzz``).
"""


class GatewayError(Exception):
    """Base class of every error raised by the cores."""


class LocalProtocolError(GatewayError):
    """The caller used a core incorrectly."""


class InvalidArgument(LocalProtocolError, ValueError):
    """A builder or constructor was given a value it cannot encode or use (a bug of the
    caller, never hostile input). Also a ``ValueError``, as these raised before."""


class RemoteProtocolError(GatewayError):
    """The remote side sent something that violates the protocol."""


class MalformedPacket(RemoteProtocolError):
    """Bytes that do not parse as the expected wire format."""


class MalformedMessage(RemoteProtocolError, ValueError):
    """Structured input (a portal frame or field, a candidate line, a resource) that does
    not validate. Also a ``ValueError``, so the callers that drop a bad message on
    ``ValueError`` keep working; new code should catch :class:`RemoteProtocolError`."""
