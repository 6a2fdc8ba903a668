"""TURN client (RFC 8656) as snownet uses it: one sans-IO allocation per relay."""
