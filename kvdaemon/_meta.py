"""memcached's meta commands (placeholder until implemented)."""


def text_commands(handler):
    return {}
