"""Build: the hot-path modules are compiled to C extensions with mypyc.

Theory of operation: the modules below are plain, mypy-strict Python; mypyc turns each into a C
extension that CPython imports instead of the .py file beside it. On W1 (HTTPS keep-alive) this
takes the worker from ~47 to ~27 us per request, because two thirds of that CPU was the
interpreter running these modules (docs/performance.md). Everything else, and every plugin,
stays interpreted; the classes plugins or other modules subclass are marked
``allow_interpreted_subclasses``.

The compiled build is an optimisation, never a requirement: with TSPROXY_PURE_PYTHON=1 in the
environment, or when mypyc or a C compiler is missing or fails, the same modules run as Python.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

COMPILED = [
    "iocore/records/config_processor.py",
    "iocore/eventsystem/event.py",
    "iocore/eventsystem/iobuffer.py",
    "iocore/eventsystem/ethread.py",
    "iocore/net/net_vconnection.py",
    "iocore/net/net_handler.py",
    "iocore/net/net_accept.py",
    "iocore/net/tls_data_path.py",
    "iocore/net/ssl_net_vconnection.py",
    "iocore/net/outbound_hooks.py",
    "iocore/net/tls/client_hello.py",
    "iocore/net/tls/handshake.py",
    "tsproxy/http/message.py",
    "tsproxy/http/path.py",
    "tsproxy/http/parser.py",
    "tsproxy/http/transaction.py",
    "tsproxy/proxy_transaction.py",
    "tsproxy/http1_session.py",
    "tsproxy/http2_session.py",
    "tsproxy/origin_connector.py",
    "tsproxy/http_response.py",
    "tsproxy/http_txn_hooks.py",
    "tsproxy/http_sm.py",
]


def _ext_modules() -> list[object]:
    if os.environ.get("TSPROXY_PURE_PYTHON"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:  # an install without build isolation and without mypy
        print(f"tsproxy: mypyc not available ({exc}); installing pure Python", file=sys.stderr)
        return []
    try:
        exts = mypycify(COMPILED, opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
        print(f"tsproxy: mypyc failed ({exc}); installing pure Python", file=sys.stderr)
        return []
    for ext in exts:
        ext.optional = True  # a compiler failure falls back to the .py files
    return exts


setup(ext_modules=_ext_modules())
