"""One error root per package: whatever the protocol layer raises is a ProtocolError (and a
ValueError, as callers catching bad input expect); the node's errors are FedbusErrors that name
the exit code of their command."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import protocol
from node.aggregation import AggregationError
from node.checkpoint import CheckpointError
from node.contribution import ContributionError
from node.director import DirectorError
from node.endpoint import FrameRefused
from node.errors import ExitCode, FedbusError
from protocol.errors import ProtocolError


def _exceptions_defined_in(package) -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
        module = importlib.import_module(info.name)
        for _name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found.append(obj)
    return found


# Raised inside a machine and turned into data before it returns; never seen by callers.
_INTERNAL = {"protocol.events.Refused", "protocol.secagg.transitions.Aborted"}


def test_every_protocol_error_is_a_protocol_error_and_a_value_error():
    errors = [
        e
        for e in _exceptions_defined_in(protocol)
        if f"{e.__module__}.{e.__name__}" not in _INTERNAL
    ]
    names = {e.__name__ for e in errors}
    assert {
        "CodecError",
        "TensorError",
        "ParameterError",
        "GraphError",
        "SecAggClientError",
        "SecAggServerError",
        "UpdateFormatError",
        "ConfigError",
    } <= names
    for error in errors:
        assert issubclass(error, ProtocolError), error
        assert issubclass(error, ValueError), error


@pytest.mark.parametrize(
    ("error", "compatible", "code"),
    [
        (AggregationError, ValueError, ExitCode.ROUND_FAILED),
        (CheckpointError, RuntimeError, ExitCode.STATE),
        (DirectorError, RuntimeError, ExitCode.STATE),
        (ContributionError, ValueError, ExitCode.FAILURE),
        (FrameRefused, Exception, ExitCode.FAILURE),
    ],
)
def test_node_errors_are_fedbus_errors_with_their_exit_code(error, compatible, code):
    assert issubclass(error, FedbusError) and issubclass(error, compatible)
    assert error.exit_code is code
