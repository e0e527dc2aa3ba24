"""Inputs the harness refuses with the fix instead of a traceback deep inside a dependency."""
import pytest

from deltatune.bench.loop import Budget
from deltatune.errors import ConfigError
from deltatune.models import resolve_model_path


@pytest.mark.parametrize("n", [1, 2, 7])
def test_too_short_max_length(n):
    with pytest.raises(ConfigError, match=rf"max_length={n} leaves no room .* --max-length >= 8"):
        Budget(max_length=n).validate()


def test_an_empty_model_directory(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json: point --model at a Hugging Face model directory"):
        resolve_model_path(str(tmp_path))
