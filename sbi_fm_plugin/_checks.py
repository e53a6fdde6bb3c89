r"""Checks of user options shared by the modules of the package."""

__all__ = ["check_count", "check_real"]


def check_count(name: str, value: object) -> None:
    r"""Raises unless `value` is an int >= 1, naming the option `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"Expected `{name}` >= 1, got {value!r}.")


def check_real(name: str, value: object) -> None:
    r"""Raises unless `value` is an int or a float (not a bool), naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"Expected `{name}` to be a float, got {value!r}.")
