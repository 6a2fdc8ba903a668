"""Process exit codes, distinct so a supervisor can tell what happened.

The 1.4 gateway exits 1 for every fatal error; we keep 1 for "fatal, restart may help"
and give a rejected token its own code so systemd's ``RestartPreventExitStatus`` stops a
restart loop against a portal that will keep saying no.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  #: graceful stop (SIGINT/SIGTERM)
    FATAL = 1  #: runtime failure; restarting may help
    USAGE = 2  #: bad command line or configuration value
    MISSING_PRIVILEGES = 3  #: neither root nor CAP_NET_ADMIN, or no /dev/net/tun
    AUTH_REJECTED = 4  #: portal refused the token (HTTP 401/403, token_expired, join refused)
