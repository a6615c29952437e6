"""`handforge prepare NAME ...` converters that plugins add with ``cli.add_preparer``."""
import textwrap

import pytest

from handforge import cli as cli_module
from handforge.cli import build_parser, cmd_prepare, main
from handforge.errors import HandforgeError
from conftest import cli_exit

# A local plugin with one converter; it writes what it parsed, so the test sees the handler ran.
CONVERTER_PLUGIN = textwrap.dedent('''
    import pathlib
    from handforge import hookimpl

    def configure(parser):
        parser.add_argument("source")
        parser.add_argument("--out", required=True)
        parser.add_argument("--times", type=int, default=1)

    def handler(args):
        pathlib.Path(args.out).write_text(args.source * args.times)
        print("converted", args.source)
        return 0

    @hookimpl
    def register_commands(cli):
        cli.add_preparer("{name}", "turn {name} files into something", configure, handler)
''')


def write_plugin(folder, file_name: str, preparer: str):
    path = folder / file_name
    path.write_text(CONVERTER_PLUGIN.replace("{name}", preparer))
    return path


@pytest.fixture
def converter_host(host, tmp_path, monkeypatch):
    host.load_file(write_plugin(tmp_path, "converter_plugin.py", "toy_source"))
    monkeypatch.setattr(cli_module, "get_host", lambda: host)  # main() builds its parser from this host
    return host


run_main = cli_exit  # handforge ARGS in this process: (exit code, stdout, stderr)


def test_a_preparer_parses_its_own_arguments_and_runs(converter_host, capsys, tmp_path):
    out = tmp_path / "converted.txt"
    # Flags before and after the positional: the preparer's own parser, not the dataset form's.
    code, stdout, err = run_main(capsys, "prepare", "toy_source", "--times", 3, "abc", "--out", out)
    assert code == 0, err
    assert out.read_text() == "abcabcabc" and "converted abc" in stdout


def test_a_preparers_usage_errors_name_it(converter_host, capsys):
    code, _, err = run_main(capsys, "prepare", "toy_source", "abc")  # --out missing
    assert code == 2 and "usage: handforge prepare toy_source" in err and "--out" in err
    with pytest.raises(SystemExit):
        main(["prepare", "toy_source", "--help"])
    assert "turn toy_source files into something" in capsys.readouterr().out


def test_other_names_keep_the_dataset_form(converter_host):
    parser, cli = build_parser(converter_host)
    args = cli.parse(parser, ["prepare", "procedural_hands", "--num", "2", "--out", "x", "size=16"])
    assert args.handler is cmd_prepare and args.dataset == "procedural_hands" and args.options == ["size=16"]
    # The preparer's name only counts right after `prepare`: elsewhere it is a plain word.
    args = cli.parse(parser, ["prepare", "procedural_hands", "toy_source", "--num", "1", "--out", "x"])
    assert args.handler is cmd_prepare and args.options == ["toy_source"]


def test_an_unknown_name_lists_converters_and_datasets(converter_host, capsys):
    code, _, err = run_main(capsys, "prepare", "toy_sourse", "x", "--out", "y")
    assert code == 2 and "'toy_sourse' is neither a converter nor a dataset (did you mean 'toy_source'?)" in err
    assert "converters: cache, freihand, mocap, toy_source;" in err and "procedural_hands" in err and "--num" not in err


def test_prepare_help_lists_the_preparers(converter_host, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = capsys.readouterr().out
    assert "--num" in help_text  # the dataset form is still described
    lines = [line.split() for line in help_text.splitlines()]
    assert ["toy_source", "turn", "toy_source", "files", "into", "something"] in lines
    assert any(words[:1] == ["freihand"] for words in lines)  # the built-in converter, one per line


def test_a_colliding_preparer_names_both_plugins(converter_host, tmp_path):
    second = write_plugin(tmp_path, "second_plugin.py", "toy_source")
    converter_host.load_file(second)
    with pytest.raises(HandforgeError) as error:
        build_parser(converter_host)
    message = str(error.value)
    assert "preparer 'toy_source' is added twice" in message
    assert "converter_plugin.py" in message and "second_plugin.py" in message


def test_a_collision_with_a_builtin_names_the_builtin(host, tmp_path):
    host.load_file(write_plugin(tmp_path, "impostor.py", "freihand"))
    with pytest.raises(HandforgeError, match=r"'freihand' is added twice: by handforge\.plugins\.datasets\.freihand "
                                             r"\(handforge [\d.]+\) and by .*impostor\.py"):
        build_parser(host)
