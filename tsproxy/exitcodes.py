"""Named exit codes of the ``tsproxy`` command and its master process.

sysexits(3)-style where a sysexits code fits; ``EX_WORKER_BOOT`` follows gunicorn's
``WORKER_BOOT_ERROR`` (3): a worker that cannot boot is neither a config error (the master
validated the config) nor an internal crash of the master.

==================  ====  ==========================================================
name                code  meaning
==================  ====  ==========================================================
EX_OK                  0  success (also: graceful stop)
EX_FAILURE             1  a generic failure (e.g. a reload some worker rejected)
EX_USAGE               2  bad command line (click's own code)
EX_WORKER_BOOT         3  workers died at boot repeatedly; the master gave up
EX_DATAERR            65  the master runs but the name or pattern asked for is wrong
                          (``metric get``/``zero`` of an unknown metric, a bad regex)
EX_UNAVAILABLE        69  a resource is busy or absent: port in use, another master
                          running, no tsproxy running for that config dir
EX_SOFTWARE           70  internal error (a bug: please report the log)
EX_TEMPFAIL           75  timed out waiting (e.g. for the master to stop)
EX_NOPERM             77  cannot switch to proxy.config.admin.user_id
EX_CONFIG             78  a configuration file is wrong (``FILE:LINE: reason``)
==================  ====  ==========================================================
"""

from __future__ import annotations

from iocore.records.errors import ConfigError, TSError

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2
EX_WORKER_BOOT = 3
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error: its ``exit_code`` attribute, else by class."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, ConfigError):
        return EX_CONFIG
    if isinstance(exc, TSError):
        return EX_FAILURE
    return EX_SOFTWARE
