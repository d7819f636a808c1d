"""``python -m data_scripts COMMAND``; see ``python -m data_scripts --help``."""

import sys

from .summary import main

if __name__ == "__main__":
    sys.exit(main())
