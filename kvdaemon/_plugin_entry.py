"""The module that ``twistd kvdaemon`` loads: its options and service maker."""

from kvdaemon._options import Options, make_service, stop_on_sigterm


def makeService(options: Options):
    """Build the kvdaemon service from parsed twistd options, and make SIGTERM exit with status 0."""
    service = make_service(options)
    stop_on_sigterm(service.reactor)
    return service


__all__ = ["Options", "makeService"]
