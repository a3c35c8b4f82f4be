"""One exception type for bad input, so every entry point can turn it into one clear message."""


class KtjaxError(ValueError):
    """Bad input from the user: a file, a config value, a flag. The message says what and what to do."""
