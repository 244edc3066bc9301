"""The one exception type that the CLI turns into a single error line and a non-zero exit."""


class Ar2dlmError(Exception):
    """A problem with the user's input or environment (bad model name, malformed data, invalid parameter).

    The message must stand on its own as one line: the CLI prints `ar2dlm: error: <message>` and exits 2.
    """
