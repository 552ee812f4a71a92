"""The module that ``twistd kvdaemon`` loads: its options and service maker."""

from kvdaemon._options import Options, make_service


def makeService(options: Options):
    """Build the kvdaemon service from parsed twistd options."""
    return make_service(options)


__all__ = ["Options", "makeService"]
