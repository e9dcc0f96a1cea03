"""Task-agnostic infrastructure: config machinery, checkpoint I/O, distributed helpers, logging,
schedules, the training engine and the errors a user can fix (``errors``).

Importing this package first checks the Python version, so that every entry script stops on an
unsupported Python with one clear line rather than a syntax or type error from deep inside.
This file must stay parseable by old Pythons."""
import sys

MIN_PYTHON = (3, 10)

if sys.version_info < MIN_PYTHON:
    raise SystemExit("this project needs Python %d.%d or newer (3.10-3.12 are supported); this is Python %s. "
                     "Create the environment with a newer python3 (see README.md)"
                     % (MIN_PYTHON + (sys.version.split()[0],)))
