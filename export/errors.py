"""The exporter's one error type: every message is meant for the person at the terminal."""


class ExportError(Exception):
    """An export that cannot go on; the message says what is wrong and, where it can, what to do."""
