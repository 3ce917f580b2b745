"""One error tree: every exception a user can meet is an `interlace.InterlaceError`, and keeps
the built-in base that code written for plain Python (or nnsight) catches."""

from __future__ import annotations

import pickle

import pytest

import interlace
from interlace import errors
from interlace.backends import client
from interlace.contract.errors import RemoteProtocolError, UnsupportedValueError, WireFormatError
from interlace.contract.options import TraceOptionError
from interlace.contract.problems import RemoteValidationError


def test_every_exception_in_the_face_is_an_interlace_error_or_a_warning():
    exported = [getattr(interlace, name) for name in interlace.__all__]
    classes = [value for value in exported if isinstance(value, type) and issubclass(value, BaseException)]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, (interlace.InterlaceError, Warning)), cls


def test_errors_all_names_classes_that_are_interlace_errors_or_warnings():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, (errors.InterlaceError, Warning)), name


@pytest.mark.parametrize("cls, builtin", [
    (errors.TracingError, ValueError),
    (errors.NotSavedError, UnboundLocalError),
    (TraceOptionError, TypeError),
    (UnsupportedValueError, TypeError),
    (errors.WaitTimeout, TimeoutError),
    (errors.ServerUnreachableError, ConnectionError),
])
def test_each_keeps_its_builtin_base(cls, builtin):
    assert issubclass(cls, errors.InterlaceError) and issubclass(cls, builtin)


def test_the_contract_and_client_errors_are_in_the_tree():
    for cls in (RemoteValidationError, RemoteProtocolError, WireFormatError, UnsupportedValueError,
                client.RemoteException, client.RemoteRequestError, client.WaitTimeout):
        assert issubclass(cls, interlace.InterlaceError), cls


def test_the_client_module_still_exports_its_errors():
    assert client.RemoteException is errors.RemoteException is interlace.RemoteException
    assert client.RemoteRequestError is errors.RemoteRequestError is interlace.RemoteRequestError
    assert client.WaitTimeout is errors.WaitTimeout is interlace.WaitTimeout


def test_the_tree_in_the_docstring_names_every_class():
    tree = errors.__doc__
    names = set(errors.__all__) | {"RemoteValidationError", "TraceOptionError", "UnsupportedValueError",
                                   "RemoteProtocolError", "WireFormatError", "ResultNotReadyError", "HostedModelError"}
    assert [name for name in sorted(names) if name not in tree] == []


def test_a_remote_exception_is_also_the_class_its_job_raised():
    error = errors.RemoteException("Traceback ...\nIndexError: list index out of range", job_id="j", category="IndexError")
    assert isinstance(error, IndexError) and isinstance(error, errors.RemoteException)
    assert isinstance(error, interlace.InterlaceError)
    own = errors.RemoteException("OutOfOrderError: ...", category="OutOfOrderError")
    assert isinstance(own, interlace.OutOfOrderError) and isinstance(own, interlace.MissedProviderError)
    assert type(errors.RemoteException("x", category="user")) is errors.RemoteException
    assert type(errors.RemoteException("x", category="warn")) is errors.RemoteException  # a function there
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, IndexError) and again.job_id == "j" and str(again) == str(error)
