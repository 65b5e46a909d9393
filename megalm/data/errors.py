"""The one exception type of the data pipeline.

`DataError` is raised for problems a user can fix (a missing file, a flag that does not parse, a
corrupt index). Its message names the file or flag at fault and says what to do; the command-line
tools print it as a single line instead of a traceback.
"""


class DataError(ValueError):
    """A data file, or a data flag, that cannot be used. The message names it and the fix."""
