"""Re-entry of the Duo launcher (duo_launch.py) for the ranks that Lightning's
DDP starts: Lightning re-runs ``sys.argv``, whose first element the launcher
set to this file; the launcher's options come from ``$DUO_FAST_DUO_LAUNCH``,
set by the first process. Not meant to be run by hand."""

import os
import sys

if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0]: its modules must not shadow top-level names.
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    from duo_fast.integrations.duo_launch import relaunch

    relaunch(sys.argv[1:])
