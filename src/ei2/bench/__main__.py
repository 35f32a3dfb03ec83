"""`python -m ei2.bench SPEC ...`: the same as `ei2 bench SPEC ...`."""
import argparse
import sys

from ..errors import EI2Error
from . import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ei2")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args)
    except EI2Error as e:
        print(f"ei2: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
