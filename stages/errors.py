"""Errors the engines raise for bad input: each names the parameter or folder at fault."""


class InvalidParameter(ValueError):
    """A request parameter is out of range or malformed; `param` names it (API field / CLI flag)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields intact
        return type(self), (self.param, self.message)


class CheckpointError(ValueError):
    """A checkpoint folder is missing, empty, unreadable or not a diffusers pipeline."""
