"""Start the hub: daphne, as `daphne` would, minus work it throws away.

    python -m porten.serve -b 127.0.0.1 -p 8000 porten.asgi:application   (daphne's own arguments)

Twisted, under daphne, parses every POST body sent as a form (urlencoded or multipart) into
`request.args`, which daphne never reads: it hands the raw body to the ASGI app. For every other
POST it still parses the Content-Type header through the `email` package, which builds header
classes at run time: about 8 % of the hub's CPU per /v1 call, measured with bench/stub_engine.py.
A large multipart upload was also parsed in memory before Django's size limit could refuse it.
Twisted's Request has a switch for this (parsePOSTFormSubmission); daphne does not pass it.
Twisted's HTTPFactory also formats a second access-log line per request into its own log, which
nothing here reads: daphne writes the access log operators see.
"""
from __future__ import annotations

import sys


def _lean_daphne() -> None:
    from daphne import http_protocol, server

    class WebRequest(http_protocol.WebRequest):
        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("parsePOSTFormSubmission", False)
            super().__init__(*args, **kwargs)

    class HTTPFactory(http_protocol.HTTPFactory):
        def log(self, request) -> None:
            pass  # daphne's own access log (--access-log, stdout by default) is the one operators read

    # daphne builds its factory, and the factory each connection's requests, from these module names.
    http_protocol.WebRequest = WebRequest
    server.HTTPFactory = HTTPFactory


def main(argv: list[str] | None = None) -> None:
    _lean_daphne()
    from daphne.cli import CommandLineInterface

    CommandLineInterface().run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
