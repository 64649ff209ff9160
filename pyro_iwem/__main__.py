"""``python -m pyro_iwem``: the ``pyro-iwem`` command line."""

import sys

from pyro_iwem.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
