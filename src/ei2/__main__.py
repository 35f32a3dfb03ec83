"""`python -m ei2` runs the `ei2` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
