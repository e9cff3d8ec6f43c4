"""Pull balenaCloud release images by application slug.

A read-only reverse proxy for the Docker Registry HTTP API v2 / OCI distribution API that maps
``<org>/<app>/<commit|semver>`` names onto the opaque ``v2/<hash>`` repositories of the upstream
registry, using the ``alias`` entries of the balena API's registry tokens.
"""

__version__ = "0.1.0"
