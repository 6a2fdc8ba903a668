"""A development portal: speaks the 1.4 portal protocol to gateways and dev clients.

Not the real Firezone portal: a small, config-driven stand-in (``python -m devportal
--config config/devportal.yaml``) for local runs and end-to-end tests. It derives ICE
credentials, PSKs and relay credentials the way the real portal does
(:mod:`gateway.portal.derive`) and exposes test hooks on :class:`DevPortal`.
"""

from devportal.config import DevPortalConfig, load_config, parse_config
from devportal.server import DevPortal

__all__ = ["DevPortal", "DevPortalConfig", "load_config", "parse_config"]
