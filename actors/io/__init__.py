"""IO adapters behind small Protocols (see ports.py) so actors can be tested without root."""
