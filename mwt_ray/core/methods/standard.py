"""Standard training: the plain network and cross-entropy alone (the reference every method is scored against)."""
from . import Method, register_method

STANDARD = register_method(Method(name="standard", summary="the plain network, cross-entropy only",
                                  insert_units=None, objective=None))
