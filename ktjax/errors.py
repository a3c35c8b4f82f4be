"""One exception type for bad input, so every entry point can turn it into one clear message."""


class KtjaxError(ValueError):
    """Bad input from the user: a file, a config value, a flag. The message says what and what to do."""


def require_finite(values, what: str):
    """Refuse a weight holding NaN or Inf, naming it (`what`): it would make every logit NaN, and generation would
    end at once with an empty completion. Checks the array already in memory; integer arrays are skipped."""
    import numpy as np

    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.integer):
        return
    finite = np.isfinite(values)
    if not finite.all():
        raise KtjaxError(f"{what} holds {finite.size - int(finite.sum())} NaN or Inf value(s) of {finite.size}; "
                         "the weights are damaged: re-download (or re-convert) the model")
