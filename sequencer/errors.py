"""User-facing errors: anything a user can cause. The CLI prints their one-line message and exits 2."""


class UserError(ValueError):
    """A mistake in an argument, a file or a dataset; ``str(err)`` names the thing and says what is wrong."""
