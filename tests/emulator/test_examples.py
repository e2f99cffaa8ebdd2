"""The device examples in examples/ run as the README shows them, and do what they say."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()


@pytest.mark.parametrize("name, expected", [
    ("port_device", [5, 4, 3, 2, 1]),
    ("mmio_device", (1, 1)),                       # one ring, one interrupt
    ("pci_function", (0x1000_1AF4, 0x1234)),
])
def test_device_example(name, expected, capsys):
    assert example(name) == expected
    assert capsys.readouterr().out
