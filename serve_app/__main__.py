"""`yolo-tokens` and `python -m serve_app`: the environment rules first, then the commands.

The commands (serve_app/cli.py) import Ray, and Ray reads part of its environment once, when it is
imported: so this entry point applies the rules (serve_app/launcher.py) before it imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from serve_app import launcher


def main(argv: Sequence[str] | None = None) -> int:
    launcher.apply_environment()
    from serve_app import cli  # only now, after the rules: importing the commands imports Ray

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
