"""User-facing errors: anything a user can cause. The CLI prints their one-line message and exits 2."""


class UserError(ValueError):
    """A mistake in an argument, a file or a dataset; ``str(err)`` names the thing and says what is wrong."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name where the message is empty (a bare assert)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def one_line(err: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it with a traceback."""
    msg = str(err).strip()
    if 'Original Traceback' in msg:  # re-raised from a DataLoader worker: keep the original message
        last = msg.splitlines()[-1]
        msg = last.split(': ', 1)[1] if ': ' in last and last.split(': ', 1)[0].endswith('Error') else last
    return ' '.join(msg.split('\n')) if msg else type(err).__name__
