"""``python -m balena_registry_proxy``: the same as the ``balena-registry-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
