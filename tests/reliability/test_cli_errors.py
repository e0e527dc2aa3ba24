"""Every user-facing CLI failure ends with one `deltatune: error: ...` line and no traceback;
`--debug` shows it (issue 18)."""
import pytest

import deltatune as dt
from deltatune import cli
from deltatune.errors import ConfigError


@pytest.mark.parametrize("exc", [ValueError("bad csv"), OSError("disk full"), KeyError("label"),
                                 ConfigError("names the fix")])
def test_one_error_line_and_debug_shows_the_traceback(monkeypatch, capsys, exc):
    parser = cli.build_parser()
    args = parser.parse_args(["methods"])

    def boom(_):
        raise exc

    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: setattr(args, "func", boom) or args)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deltatune: error: ") and "Traceback" not in err[0]
    args.debug = True
    with pytest.raises(type(exc)):
        cli.main(["--debug", "methods"])


@pytest.mark.parametrize("targets", ["(query", "[value", "*dense"])
def test_an_invalid_regex_names_the_field_and_the_list_form(targets):
    with pytest.raises(ConfigError, match=r"targets=.* valid regular expression .* pass a list"):
        dt.LoRAConfig(targets=targets)
    with pytest.raises(ConfigError, match=r"exclude=.* valid regular expression"):
        dt.LoRAConfig(exclude=targets)
