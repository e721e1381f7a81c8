"""``python -m featurezoo ...`` runs the ``featurezoo`` command."""
import sys

from .cli import main

sys.exit(main())
