"""How the training scripts run from the command line: an error the user can fix is one line, not a traceback.

    if __name__ == "__main__":
        sys.exit(run(main, "train.ldm"))
"""

from __future__ import annotations

import sys

from sdjax.errors import SdjaxError


def run(main, prog: str, argv=None) -> int:
    """main(argv); its SdjaxError (bad config, data, folder, ...) is printed as `prog: error: ...`, exit code 2."""
    try:
        main(argv)
    except SdjaxError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
