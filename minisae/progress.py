"""One progress bar for every long job (training, caching, evaluation, the compare sweep)."""

from tqdm.auto import tqdm


def progress_bar(total, *, enabled=True, initial=0, desc=None, unit="it", **kwargs):
    """A tqdm bar; with enabled=False the same object, silent (tqdm's `disable`)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not enabled, **kwargs)
