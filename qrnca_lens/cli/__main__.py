"""``python -m qrnca_lens.cli``: the same as the ``qrnca-lens`` console script."""

import sys

from . import main

if __name__ == "__main__":  # a package walk (pkgutil) imports this module too: it must not run then
    sys.exit(main())
