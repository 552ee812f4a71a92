"""Range commands (placeholder until implemented)."""


def text_commands(handler):
    return {}
