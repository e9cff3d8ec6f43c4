"""``python -m balena_registry_proxy.sandbox``: the same as ``balena-registry-proxy sandbox``."""

import sys

from .command import main

sys.exit(main())
