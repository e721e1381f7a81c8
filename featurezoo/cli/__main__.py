"""``python -m featurezoo.cli ...`` runs the ``featurezoo`` command (as ``python -m featurezoo`` does)."""
import sys

from . import main

sys.exit(main())
