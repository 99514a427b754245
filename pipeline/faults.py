"""Named crash points for the fault-injection tests.

``VERBATIM_CRASH_AT=<name>`` makes the process SIGKILL itself when it reaches that point, so a test
can prove that a crash at exactly that moment loses nothing and completes nothing twice. The variable
is read once at start (the tests set it for a subprocess), so unset it costs one comparison. Points,
in the order a job passes them:

- ``after_claim``       jobs leased, nothing sent yet
- ``after_api``         the provider answered (every answer spooled), nothing staged yet
- ``after_temp_write``  an output is written into the attempt's staging folder
- ``before_commit``     all outputs are staged, the completion not yet committed
- ``in_commit``         inside the completing transaction, before COMMIT
- ``after_commit``      committed, the staged outputs not yet moved to their final names
"""

import os
import signal

POINTS = ("after_claim", "after_api", "after_temp_write", "before_commit", "in_commit", "after_commit")
# A test hook, not a setting: the fault tests arm it for a subprocess they kill on purpose. It is
# read here, once at import, rather than carried in Settings, so that no production path has to
# pass it along and a run can never be configured to crash by a .env file (Settings ignores it).
_ARMED = os.environ.get("VERBATIM_CRASH_AT")


def crash_point(name: str) -> None:
    if _ARMED == name:
        os.kill(os.getpid(), signal.SIGKILL)
